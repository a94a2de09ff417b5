// Package cli owns keel's operator commands against the coordinator:
// `keel volume create|list|status|delete`, `keel node list|drain` and
// `keel cluster status` (recovery: mode, copy slots, alarms, reserve per
// node). The keel binary attaches them; `keel node` itself (the storage daemon) is the
// node package's, which adds NodeAdminCommands under it. (`keel coord`,
// which runs a cell member, is ctl/coordsvc's CoordCommand: this package
// may not import that one.)
//
// Every operator command takes --coord (one or more member URLs; default
// $KEEL_COORD, else http://127.0.0.1:7400), --output table|json and
// --timeout, and talks to the cell through ctl/coordclient, so it retries
// shed or leaderless calls with backoff.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
)

// DefaultCoordURL is where operator commands look for the coordinator when
// neither --coord nor KEEL_COORD says otherwise.
const DefaultCoordURL = "http://127.0.0.1:7400"

// opts are the flags every operator command shares.
type opts struct {
	coord   []string
	output  string
	timeout time.Duration
}

func (o *opts) bind(cmd *cobra.Command) {
	def := []string{DefaultCoordURL}
	if env := os.Getenv("KEEL_COORD"); env != "" {
		def = strings.Split(env, ",")
	}
	f := cmd.PersistentFlags()
	f.StringSliceVar(&o.coord, "coord", def, "coordinator member URLs, comma-separated (default $KEEL_COORD or "+DefaultCoordURL+")")
	f.StringVarP(&o.output, "output", "o", "table", "output format: table or json")
	f.DurationVar(&o.timeout, "timeout", 30*time.Second, "give up on the coordinator after this long (retries included)")
}

// client checks the shared flags and returns a client and a context
// bounded by --timeout.
func (o *opts) client(cmd *cobra.Command) (*coordclient.Client, context.Context, context.CancelFunc, error) {
	switch o.output {
	case "table", "json":
	default:
		return nil, nil, nil, fmt.Errorf("--output %q: use --output table or --output json", o.output)
	}
	if o.timeout <= 0 {
		return nil, nil, nil, fmt.Errorf("--timeout %v: give a positive duration, e.g. --timeout 30s", o.timeout)
	}
	c, err := coordclient.New(coordclient.Config{URLs: o.coord, Attempts: 8})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--coord: %w (or set KEEL_COORD)", err)
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
	return c, ctx, cancel, nil
}

// explain turns a client error into one an operator can act on.
func (o *opts) explain(what string, err error) error {
	var ae *coordapi.Error
	if errors.As(err, &ae) {
		return fmt.Errorf("%s: %s", what, ae.Message)
	}
	var oe *net.OpError
	if errors.Is(err, syscall.ECONNREFUSED) || errors.As(err, &oe) {
		return fmt.Errorf("%s: cannot reach the coordinator at %s: is `keel coord` running there? (set --coord or KEEL_COORD): %w", what, strings.Join(o.coord, ","), err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: no answer from the coordinator at %s within --timeout %v: %w", what, strings.Join(o.coord, ","), o.timeout, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (o *opts) json(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func table(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

// since prints a time and how long ago it was.
func since(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05") + " (" + ago(now.Sub(t)) + ")"
}

func ago(d time.Duration) string {
	switch {
	case d < 0:
		return "in the future"
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm ago", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd ago", int(d.Hours()/24))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func joinIDs(ids []coordapi.NodeID) string {
	if len(ids) == 0 {
		return "-"
	}
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = string(id)
	}
	return strings.Join(s, ",")
}
