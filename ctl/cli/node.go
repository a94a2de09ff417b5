package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
)

// NodeAdminCommands are `list` and `drain`, for the keel binary to attach
// under `keel node`. Each carries the shared operator flags itself, since
// its parent is the node daemon's command.
func NodeAdminCommands() []*cobra.Command {
	return []*cobra.Command{nodeList(), nodeDrain()}
}

func nodeList() *cobra.Command {
	var o opts
	cmd := &cobra.Command{
		Use:   "list",
		Short: "list storage nodes: lease state, space, quarantine, reserve and its alarm, draining",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer cancel()
			nodes, err := c.Nodes(ctx)
			if err != nil {
				return o.explain("node list", err)
			}
			if o.output == "json" {
				return o.json(cmd.OutOrStdout(), coordapi.NodeList{Nodes: nodes})
			}
			now := time.Now()
			w := table(cmd.OutOrStdout())
			fmt.Fprintln(w, "ID\tZONE\tSTATE\tSINCE\tDRAINING\tCAPACITY\tALLOCATED\tQUARANTINED\tRESERVE\tRESERVE-USED\tAVAILABLE\tPRIMARIES\tREPLICAS\tADDRESS\tALARM")
			for _, n := range nodes {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%v\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n", n.ID, orDash(n.Zone), n.State, since(n.Since, now), n.Draining,
					coordapi.FormatBytes(n.Capacity), coordapi.FormatBytes(n.Allocated), coordapi.FormatBytes(n.Quarantined), coordapi.FormatBytes(n.Reserve),
					coordapi.FormatBytes(n.ReserveUsed), coordapi.FormatBytes(n.Available), n.Primaries, n.Replicas, n.PrimaryAddr, orDash(n.ReserveAlarm))
			}
			return w.Flush()
		},
	}
	o.bind(cmd)
	return cmd
}

func nodeDrain() *cobra.Command {
	var o opts
	var undo bool
	cmd := &cobra.Command{
		Use:   "drain NODE [--undo]",
		Short: "stop placing replicas on a node and hand its primaries to other in-sync replicas",
		Long: `drain marks a node draining: it gets no new replicas, and for each volume it
leads that has another live in-sync replica the primary role is handed over
(the volume is fenced for a moment while the old primary steps down). Its
secondary replicas stay until re-mirrored elsewhere. --undo ends the drain.`,
		Args: exactlyOne("the node's ID, e.g. keel node drain n3"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := coordapi.NodeID(args[0])
			if err := id.Validate(); err != nil {
				return err
			}
			c, ctx, cancel, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer cancel()
			n, err := c.Drain(ctx, id, undo)
			if err != nil {
				return o.explain("node drain "+args[0], err)
			}
			if o.output == "json" {
				return o.json(cmd.OutOrStdout(), n)
			}
			if undo {
				fmt.Fprintf(cmd.OutOrStdout(), "node %s no longer draining\n", n.ID)
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "node %s draining: still primary of %d and holding %d replicas\n", n.ID, n.Primaries, n.Replicas)
			}
			return nil
		},
	}
	o.bind(cmd)
	cmd.Flags().BoolVar(&undo, "undo", false, "end the drain")
	return cmd
}
