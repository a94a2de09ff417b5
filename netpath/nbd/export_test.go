package nbd

// SetShutdownHook makes Shutdown call f once it has interrupted every
// session (before it waits for them), so that tests can order events
// without sleeping.
func SetShutdownHook(s *Server, f func()) { s.testShutdownHook = f }
