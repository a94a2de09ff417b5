package coordapi

import (
	"fmt"
	"net/http"
)

// Code classifies an API error.
type Code string

const (
	CodeBadRequest Code = "bad_request" // 400: malformed or invalid request
	CodeNotFound   Code = "not_found"   // 404: unknown volume, node or path
	CodeConflict   Code = "conflict"    // 409: exists already, or contradicts the state
	CodeStaleEpoch Code = "stale_epoch" // 409: the request names an epoch that is not current
	CodeNotPrimary Code = "not_primary" // 409: the caller is not the volume's primary
	CodeTooLarge   Code = "too_large"   // 413: body over the class's limit
	CodeNoCapacity Code = "no_capacity" // 507: placement impossible without the reserve
	CodeOverloaded Code = "overloaded"  // 503: shed; retry after RetryAfter
	CodeNotLeader  Code = "not_leader"  // 503: no leader reachable right now
	CodeTimeout    Code = "timeout"     // 504: the deadline passed; the outcome is unknown
	CodeInternal   Code = "internal"    // 500
)

// Error is the body of every failed call, and the error type the client
// returns for them.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
	// CurrentEpoch accompanies stale_epoch.
	CurrentEpoch Epoch `json:"current_epoch,omitempty"`
	// RetryAfter accompanies 503 answers (also sent as a Retry-After header).
	RetryAfter Duration `json:"retry_after,omitempty"`
	// HTTPStatus is the status the error arrived with (client side only).
	HTTPStatus int `json:"-"`
}

func (e *Error) Error() string {
	if e.CurrentEpoch != 0 {
		return fmt.Sprintf("%s: %s (current epoch %d)", e.Code, e.Message, e.CurrentEpoch)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

// Errorf makes an *Error.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Status is the HTTP status for the error's code.
func (e *Error) Status() int {
	switch e.Code {
	case CodeBadRequest:
		return http.StatusBadRequest
	case CodeNotFound:
		return http.StatusNotFound
	case CodeConflict, CodeStaleEpoch, CodeNotPrimary:
		return http.StatusConflict
	case CodeTooLarge:
		return http.StatusRequestEntityTooLarge
	case CodeNoCapacity:
		return http.StatusInsufficientStorage
	case CodeOverloaded, CodeNotLeader:
		return http.StatusServiceUnavailable
	case CodeTimeout:
		return http.StatusGatewayTimeout
	default:
		return http.StatusInternalServerError
	}
}

// Retryable reports whether the same call may succeed if tried again
// later: overload, no leader, timeouts and internal errors.
func (e *Error) Retryable() bool {
	switch e.Code {
	case CodeOverloaded, CodeNotLeader, CodeTimeout, CodeInternal:
		return true
	}
	return false
}
