package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
	"keel/datapath/volume"
	"keel/netpath/nbd"
)

// The volume is the NBD server's backend.
var _ nbd.Backend = (*volume.Volume)(nil)

// ServeConfig is what `keel serve` runs: one volume, standalone.
type ServeConfig struct {
	File     string
	Size     int64 // 0: take the size of an existing volume
	Listen   string
	Unix     string
	Name     string
	ReadOnly bool
	Metrics  string // address of the Prometheus endpoint, "" for none
	Logger   *slog.Logger
	// ShutdownTimeout bounds how long in-flight requests may take to finish
	// after a stop signal.
	ShutdownTimeout time.Duration
}

// ServeCommand is `keel serve`.
func ServeCommand() *cobra.Command {
	var cfg ServeConfig
	var size string
	cmd := &cobra.Command{
		Use:   "serve --file PATH --size SIZE --listen ADDR",
		Short: "serve one volume over NBD, standalone (no coordinator, no replication)",
		Long: `serve opens (or creates and preallocates) one volume file with O_DIRECT and
serves it over NBD on a TCP address and optionally a Unix socket, until
SIGINT or SIGTERM: then in-flight requests finish, data is flushed and the
volume is marked cleanly shut down.`,
		Example: `  keel serve --file data/v.vol --size 4G --listen 127.0.0.1:10809
  qemu-io -f raw -c 'write -P 0xab 0 64k' nbd://127.0.0.1:10809`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.File == "" {
				return errors.New("--file is required: the path of the volume file (created when missing)")
			}
			if cfg.Listen == "" && cfg.Unix == "" {
				return errors.New("--listen or --unix is required: where NBD clients connect, e.g. --listen 127.0.0.1:10809")
			}
			if size != "" {
				n, err := coordapi.ParseSize(size)
				if err != nil {
					return fmt.Errorf("--size: %w", err)
				}
				cfg.Size = n
			}
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return Serve(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.File, "file", "", "volume file (created and preallocated when missing)")
	f.StringVar(&size, "size", "", "volume size, e.g. 4G (required to create; must match an existing volume)")
	f.StringVar(&cfg.Listen, "listen", "", "TCP address for NBD clients, e.g. 127.0.0.1:10809")
	f.StringVar(&cfg.Unix, "unix", "", "also serve NBD on this Unix socket path")
	f.StringVar(&cfg.Name, "name", "default", "export name (the empty name also reaches this volume)")
	f.BoolVar(&cfg.ReadOnly, "read-only", false, "refuse writes (EPERM) and advertise the export read-only")
	f.StringVar(&cfg.Metrics, "metrics", "", "serve Prometheus metrics (/metrics) and Go profiles (/debug/pprof/) on this address, e.g. 127.0.0.1:9109")
	f.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", 30*time.Second, "how long in-flight requests may take to finish after SIGINT/SIGTERM")
	return cmd
}

// Serve runs one standalone volume until ctx is done, then shuts down in
// order: stop accepting, finish in-flight requests, flush, mark clean.
func Serve(ctx context.Context, cfg ServeConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	vol, err := volume.Open(cfg.File, volume.Options{
		Size:     cfg.Size,
		Create:   true,
		ReadOnly: cfg.ReadOnly,
		Logger:   log,
	})
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv := nbd.NewServer(nbd.Config{
		Logger:  log,
		Exports: []nbd.Export{{Name: cfg.Name, Description: "keel volume " + cfg.File, Backend: vol, ReadOnly: cfg.ReadOnly}},
		Metrics: nbd.NewMetrics(reg),
	})

	var listeners []net.Listener
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	if cfg.Listen != "" {
		l, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			vol.Close()
			return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
		}
		listeners = append(listeners, l)
	}
	if cfg.Unix != "" {
		if fi, err := os.Stat(cfg.Unix); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(cfg.Unix) // a stale socket of an earlier run
		}
		l, err := net.Listen("unix", cfg.Unix)
		if err != nil {
			closeAll()
			vol.Close()
			return fmt.Errorf("listen on unix socket %s: %w", cfg.Unix, err)
		}
		listeners = append(listeners, l)
	}
	var metricsSrv *http.Server
	if cfg.Metrics != "" {
		ml, err := net.Listen("tcp", cfg.Metrics)
		if err != nil {
			closeAll()
			vol.Close()
			return fmt.Errorf("metrics listen on %s: %w", cfg.Metrics, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		// Profiles for benchmarks (keel bench fio takes one where a target
		// is missed): CPU, heap, goroutines, mutex and block.
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go metricsSrv.Serve(ml)
	}

	serveErr := make(chan error, len(listeners))
	for _, l := range listeners {
		log.Info("serving NBD", "addr", l.Addr().String(), "export", cfg.Name, "size", vol.Size(), "file", cfg.File, "read_only", cfg.ReadOnly)
		go func(l net.Listener) { serveErr <- srv.Serve(l) }(l)
	}
	var runErr error
	select {
	case <-ctx.Done():
		log.Info("stopping: finishing in-flight requests")
	case runErr = <-serveErr:
		log.Error("NBD listener failed", "err", runErr)
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Error("shutdown did not finish cleanly", "err", err)
	}
	closeAll()
	if cfg.Unix != "" {
		os.Remove(cfg.Unix)
	}
	if metricsSrv != nil {
		metricsSrv.Close()
	}
	if err := vol.Close(); err != nil {
		return fmt.Errorf("closing volume %s: %w", cfg.File, err)
	}
	log.Info("stopped: volume flushed and marked clean", "file", cfg.File)
	return runErr
}
