package nbd

// SetShutdownHook makes Shutdown call f once it has interrupted every
// session (before it waits for them), so that tests can order events
// without sleeping.
func SetShutdownHook(s *Server, f func()) { s.testShutdownHook = f }

// SetInline turns the reader's inline execution of requests (see
// session.handle) on or off; tests and benchmarks compare both.
func SetInline(s *Server, on bool) { s.noInline.Store(!on) }
