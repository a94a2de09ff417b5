package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"keel/datapath/iobuf"
)

// Defaults of Config.
const (
	DefaultMaxInFlight      = 128
	DefaultMaxRequest       = iobuf.MaxSize // 32 MiB, the largest buffer iobuf hands out
	DefaultMaxInFlightBytes = 64 << 20
	DefaultHandshakeTimeout = 30 * time.Second
)

// Limits of the handshake: an option's data up to maxOptionLen is read and
// parsed; up to maxOptionDrain it is read, discarded and refused with
// NBD_REP_ERR_TOO_BIG; a larger one closes the connection.
const (
	maxOptionLen   = 64 << 10
	maxOptionDrain = 16 << 20
)

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Config configures a Server.
type Config struct {
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// Exports are the exports served from the start; AddExport and
	// RemoveExport change the set later. The first export (in the order
	// added) is also the default export, the one a client gets by asking
	// for the empty name. A server may start with none.
	Exports []Export
	// MaxInFlight bounds the requests of one connection that are read and
	// not yet answered; the reader stops reading while the bound is
	// reached. 0 means DefaultMaxInFlight.
	MaxInFlight int
	// MaxInFlightBytes bounds the data buffers those requests hold. A
	// single request may exceed it when nothing else is in flight.
	// 0 means DefaultMaxInFlightBytes.
	MaxInFlightBytes int
	// MaxRequest is the largest READ or WRITE length accepted (advertised
	// as the maximum block size); larger ones get EOVERFLOW. At most and
	// by default 32 MiB.
	MaxRequest int
	// HandshakeTimeout bounds the whole handshake of a connection.
	// 0 means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// Metrics records per-export series; nil records nothing.
	Metrics *Metrics
}

// Server serves NBD exports. Its methods are safe for concurrent use.
type Server struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex // guards the fields below
	exports   []*Export  // in the order added; replaced, never modified in place
	closing   bool
	listeners map[net.Listener]struct{}
	sessions  map[*session]struct{}
	wg        sync.WaitGroup // one count per ServeConn running

	testShutdownHook func() // tests: runs once Shutdown has interrupted every session
}

// NewServer returns a server for cfg. It panics on a configuration that
// cannot work (no export, an export without a backend, limits out of
// range): those are programming errors of the caller.
func NewServer(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.MaxRequest <= 0 {
		cfg.MaxRequest = DefaultMaxRequest
	}
	if cfg.MaxRequest > iobuf.MaxSize {
		panic(fmt.Sprintf("nbd: MaxRequest %d above %d", cfg.MaxRequest, iobuf.MaxSize))
	}
	if cfg.MaxInFlightBytes <= 0 {
		cfg.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		listeners: make(map[net.Listener]struct{}),
		sessions:  make(map[*session]struct{}),
	}
	for i := range cfg.Exports {
		e := cfg.Exports[i]
		if e.Backend == nil {
			panic(fmt.Sprintf("nbd: export %q has no backend", e.Name))
		}
		e.syncBE, _ = e.Backend.(SyncBackend)
		s.exports = append(s.exports, &e)
	}
	return s
}

// lookup returns the export a client names; the empty name is the default
// export. nil if there is none.
func (s *Server) lookup(name string) *Export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lookupLocked(name)
}

// REQUIRES: s.mu.
func (s *Server) lookupLocked(name string) *Export {
	if name == "" {
		if len(s.exports) == 0 {
			return nil
		}
		return s.exports[0]
	}
	for _, e := range s.exports {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// listExports returns the exports served now, for NBD_OPT_LIST.
func (s *Server) listExports() []*Export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports
}

// AddExport starts serving e to new connections. It fails if an export of
// that name is served already, or e has no backend.
func (s *Server) AddExport(e Export) error {
	if e.Backend == nil {
		return fmt.Errorf("nbd: export %q has no backend", e.Name)
	}
	e.syncBE, _ = e.Backend.(SyncBackend)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range s.exports {
		if x.Name == e.Name {
			return fmt.Errorf("nbd: export %q is served already", e.Name)
		}
	}
	s.exports = append(s.exports[:len(s.exports):len(s.exports)], &e)
	return nil
}

// RemoveExport stops serving the export called name: new connections no
// longer find it, and every connection using it stops reading requests,
// answers what it has read (requests received in full after the stop get
// ESHUTDOWN), and closes, as on Shutdown. It returns when those
// connections have ended, or when ctx is done: then it breaks them at once
// and returns ctx's error. Removing an export that is not served is not an
// error.
func (s *Server) RemoveExport(ctx context.Context, name string) error {
	s.mu.Lock()
	var gone *Export
	kept := make([]*Export, 0, len(s.exports))
	for _, e := range s.exports {
		if e.Name == name {
			gone = e
			continue
		}
		kept = append(kept, e)
	}
	s.exports = kept
	var waits []*session
	if gone != nil {
		for ss := range s.sessions {
			if ss.bound == gone {
				ss.interrupt()
				waits = append(waits, ss)
			}
		}
	}
	s.mu.Unlock()
	for _, ss := range waits {
		select {
		case <-ss.done:
		case <-ctx.Done():
			for _, ss := range waits {
				ss.forceClose()
			}
			return ctx.Err()
		}
	}
	return nil
}

// bind records that ss serves exp; false when exp is no longer served
// (removed during the handshake) or the server is closing.
func (s *Server) bind(ss *session, exp *Export) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	for _, e := range s.exports {
		if e == exp {
			ss.bound = exp
			return true
		}
	}
	return false
}

// Serve accepts connections on l and serves each in its own goroutine
// until l fails or Shutdown is called; then it returns ErrServerClosed.
// Serve does not close l on error; Shutdown closes it.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.isClosing() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: wait and retry, as
			// net/http does, rather than spin or give up.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("nbd: accept failed; retrying", "addr", l.Addr().String(), "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if !s.addConn() {
			c.Close()
			return ErrServerClosed
		}
		go func() {
			defer s.wg.Done()
			s.serve(c)
		}()
	}
}

// ServeConn serves one connection (TCP, Unix socket or any other stream)
// and returns when it is closed. It closes c.
func (s *Server) ServeConn(c net.Conn) {
	if !s.addConn() {
		c.Close()
		return
	}
	defer s.wg.Done()
	s.serve(c)
}

// addConn counts a connection for Shutdown to wait on; false once the
// server is closing.
func (s *Server) addConn() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.wg.Add(1)
	return true
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// register adds a session for Shutdown to interrupt; false if the server
// is already closing.
func (s *Server) register(ss *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.sessions[ss] = struct{}{}
	return true
}

func (s *Server) unregister(ss *session) {
	s.mu.Lock()
	delete(s.sessions, ss)
	s.mu.Unlock()
}

// Shutdown stops the server gracefully: it closes the listeners, stops
// reading new requests on every connection (requests already received in
// full are answered with ESHUTDOWN), lets the requests in flight finish
// and their replies be sent, then closes the connections. It returns when
// every connection has ended, or when ctx is done: then it closes the
// remaining connections at once and returns ctx's error without waiting
// for backend calls that do not return.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for ss := range s.sessions {
		ss.interrupt()
	}
	for l := range s.listeners {
		l.Close()
	}
	s.mu.Unlock()
	if s.testShutdownHook != nil {
		s.testShutdownHook()
	}

	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for ss := range s.sessions {
			ss.forceClose()
		}
		s.mu.Unlock()
		return ctx.Err()
	}
}

// serve runs one connection: handshake, then transmission.
func (s *Server) serve(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	ss := newSession(s, c)
	defer close(ss.done)
	if !s.register(ss) {
		c.Close()
		return
	}
	defer s.unregister(ss)
	defer c.Close()
	if err := ss.handshake(); err != nil {
		if !errors.Is(err, errAbort) {
			ss.log.Debug("nbd: handshake ended", "err", err)
		}
		return
	}
	ss.transmit()
}
