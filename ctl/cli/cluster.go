package cli

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
)

// ClusterCommand is `keel cluster` with status: the storm control's view
// of the whole cell.
func ClusterCommand() *cobra.Command {
	var o opts
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "show the cluster's recovery state: mode, copy slots, alarms, reserve per node",
		Args:  cobra.NoArgs,
	}
	o.bind(cmd)
	cmd.AddCommand(clusterStatus(&o))
	return cmd
}

// ClusterStatus is what `keel cluster status -o json` prints.
type ClusterStatus struct {
	Cluster coordapi.Cluster `json:"cluster"`
	Nodes   []coordapi.Node  `json:"nodes"`
}

func clusterStatus(o *opts) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "mode (normal or mass-failure), slots in use, volumes by state, alarms, reserve per node",
		Long: `status shows the coordinator's storm control: whether the cell is in
mass-failure mode (many replicas lost at once: no new replicas are placed,
primaries wait for their previous replicas to return), the catch-up and
re-mirror slots in use against their limits, the volumes by state, the
alarms (reserve in use, volumes that could not be re-placed), and for each
node its reserve, how much of it re-mirrors use, and the space quarantined
on it for replicas given up but not yet re-mirrored elsewhere.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer cancel()
			cl, err := c.Cluster(ctx)
			if err != nil {
				return o.explain("cluster status", err)
			}
			nodes, err := c.Nodes(ctx)
			if err != nil {
				return o.explain("cluster status", err)
			}
			if o.output == "json" {
				return o.json(cmd.OutOrStdout(), ClusterStatus{Cluster: *cl, Nodes: nodes})
			}
			printCluster(cmd, cl, nodes, time.Now())
			return nil
		},
	}
}

func printCluster(cmd *cobra.Command, cl *coordapi.Cluster, nodes []coordapi.Node, now time.Time) {
	out := cmd.OutOrStdout()
	r := cl.Recovery
	mode := string(cl.Mode)
	if !cl.ModeSince.IsZero() {
		mode += " since " + since(cl.ModeSince, now)
	}
	fmt.Fprintf(out, "mode:        %s\n", mode)
	if cl.ModeReason != "" {
		fmt.Fprintf(out, "             %s\n", cl.ModeReason)
	}
	fmt.Fprintf(out, "losses:      %d within %s (mass-failure mode at %d)\n", cl.RecentLoss, r.MassFailureWindow, r.MassFailureLosses)
	fmt.Fprintf(out, "slots:       re-mirrors %d of %d (%d per node), catch-ups %d (%d per node)\n", cl.Remirrors, r.MaxRemirrors, r.MaxRemirrorsPerNode, cl.CatchUps, r.MaxCatchUpsPerNode)
	fmt.Fprintf(out, "volumes:     %d: ok %d, degraded %d, impaired %d, fenced %d\n", cl.Volumes,
		cl.ByState[coordapi.StateOK], cl.ByState[coordapi.StateDegraded], cl.ByState[coordapi.StateImpaired], cl.ByState[coordapi.StateFenced])
	var ms []string
	for _, st := range []coordapi.MemberState{coordapi.MemberInSync, coordapi.MemberOutOfSync, coordapi.MemberCatchingUp, coordapi.MemberNeedsCopy, coordapi.MemberRemirror} {
		ms = append(ms, fmt.Sprintf("%s %d", st, cl.MembersByState[st]))
	}
	fmt.Fprintf(out, "members:     %s\n", strings.Join(ms, ", "))
	fmt.Fprintf(out, "quarantined: %s\n", coordapi.FormatBytes(cl.Quarantined))
	fmt.Fprintf(out, "since start: %d slots granted, %d refused; %d rejoins; %d members given up, %d placed; copied %s by catch-up, %s by re-mirror\n",
		cl.SlotsGranted, cl.SlotsRefused, cl.Rejoins, cl.Gone, cl.Placed, coordapi.FormatBytes(cl.CopiedCatchUp), coordapi.FormatBytes(cl.CopiedRemirror))
	fmt.Fprintf(out, "grace:       %s before an absent replica is given up\n", r.Grace)
	if len(cl.Alarms) == 0 {
		fmt.Fprintln(out, "alarms:      none")
	} else {
		fmt.Fprintln(out, "alarms:")
		for _, a := range cl.Alarms {
			fmt.Fprintf(out, "  %s\n", a)
		}
	}
	fmt.Fprintln(out)
	w := table(out)
	fmt.Fprintln(w, "NODE\tSTATE\tCAPACITY\tALLOCATED\tQUARANTINED\tRESERVE\tRESERVE-USED\tAVAILABLE\tALARM")
	for _, n := range nodes {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, n.State, coordapi.FormatBytes(n.Capacity), coordapi.FormatBytes(n.Allocated),
			coordapi.FormatBytes(n.Quarantined), coordapi.FormatBytes(n.Reserve), coordapi.FormatBytes(n.ReserveUsed), coordapi.FormatBytes(n.Available), orDash(n.ReserveAlarm))
	}
	w.Flush()
}
