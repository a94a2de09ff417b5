package cli

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
)

// VolumeCommand is `keel volume` with create, list, status and delete.
func VolumeCommand() *cobra.Command {
	var o opts
	cmd := &cobra.Command{
		Use:   "volume",
		Short: "create, list, inspect and delete volumes (talks to the coordinator)",
		Args:  cobra.NoArgs,
	}
	o.bind(cmd)
	cmd.AddCommand(volumeCreate(&o), volumeList(&o), volumeStatus(&o), volumeDelete(&o))
	return cmd
}

func volumeCreate(o *opts) *cobra.Command {
	var size string
	var replicas int
	cmd := &cobra.Command{
		Use:     "create NAME --size SIZE [--replicas N]",
		Short:   "create a volume: replicas on distinct nodes, distinct zones where there are any",
		Example: "  keel volume create data --size 4G --replicas 2",
		Args:    exactlyOne("the volume's name, e.g. keel volume create data --size 4G"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if size == "" {
				return errors.New("--size is required: the volume's size, e.g. --size 4G")
			}
			n, err := coordapi.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			if n%coordapi.SizeAlign != 0 {
				return fmt.Errorf("--size %s: must be a multiple of 4KiB (%d bytes)", size, n)
			}
			if replicas < 1 || replicas > coordapi.MaxReplicas {
				return fmt.Errorf("--replicas %d: give 1 to %d", replicas, coordapi.MaxReplicas)
			}
			if err := coordapi.ValidateVolumeName(args[0]); err != nil {
				return err
			}
			c, ctx, cancel, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer cancel()
			v, err := c.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: args[0], Size: n, Replicas: replicas})
			if err != nil {
				return o.explain("volume create "+args[0], err)
			}
			if o.output == "json" {
				return o.json(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created %s (%s), %s, %d replica(s) on %s, primary %s, epoch %d\n",
				v.Name, v.ID, coordapi.FormatBytes(v.Size), v.Replicas, joinIDs(memberIDs(v)), v.Primary, v.Epoch)
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "volume size, e.g. 4G (a multiple of 4KiB)")
	cmd.Flags().IntVar(&replicas, "replicas", 2, "number of replicas, each on a distinct node")
	return cmd
}

func memberIDs(v *coordapi.Volume) []coordapi.NodeID {
	out := make([]coordapi.NodeID, len(v.Members))
	for i, m := range v.Members {
		out[i] = m.Node
	}
	return out
}

func volumeList(o *opts) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "list volumes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer cancel()
			vols, err := c.Volumes(ctx, false)
			if err != nil {
				return o.explain("volume list", err)
			}
			if o.output == "json" {
				return o.json(cmd.OutOrStdout(), coordapi.VolumeList{Volumes: vols})
			}
			w := table(cmd.OutOrStdout())
			fmt.Fprintln(w, "NAME\tID\tSIZE\tREPLICAS\tEPOCH\tPRIMARY\tSTATE")
			for _, v := range vols {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d/%d\t%d\t%s\t%s\n", v.Name, v.ID, coordapi.FormatBytes(v.Size), len(v.InSync()), v.Replicas, v.Epoch, orDash(string(v.Primary)), v.State)
			}
			return w.Flush()
		},
	}
}

func volumeStatus(o *opts) *cobra.Command {
	var impaired bool
	cmd := &cobra.Command{
		Use:   "status [NAME|ID...] [--impaired]",
		Short: "show each volume's state (ok, degraded, impaired, fenced) with the reason and since when",
		Long: `status shows, for each volume (all of them, or those named), its state
with the reason and since when, its epoch, primary and in-sync replicas.

  ok        a primary holds a valid lease and every replica is in sync
  degraded  I/O works on fewer in-sync replicas than asked for
  impaired  I/O cannot make progress: no primary can hold a lease yet, or
            the primary reports requests not completing
  fenced    write authority withdrawn on purpose (primary handover)

MEMBERS lists the replicas: an in-sync one by its node ID, any other with
its place in recovery and the copy's progress, e.g.
n2[catching_up 12MiB/40MiB 30% ETA 6s]:

  out_of_sync     left the in-sync set; waits for its node, or for a slot
  catching_up     copying only the regions written since (write-intent bitmap)
  needs_remirror  needs a whole copy (new member, or former primary); no slot yet
  remirroring     copying the whole volume

The reason says what recovery is doing (and, in mass-failure mode, that the
cell waits for previous replicas rather than placing new ones).

--impaired lists only the impaired volumes of the whole cluster.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if impaired && len(args) > 0 {
				return errors.New("--impaired lists every impaired volume: give either names or --impaired, not both")
			}
			c, ctx, cancel, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer cancel()
			var vols []coordapi.Volume
			if len(args) == 0 {
				if vols, err = c.Volumes(ctx, impaired); err != nil {
					return o.explain("volume status", err)
				}
			}
			for _, ref := range args {
				v, err := c.Volume(ctx, ref)
				if err != nil {
					return o.explain("volume status "+ref, err)
				}
				vols = append(vols, *v)
			}
			if o.output == "json" {
				return o.json(cmd.OutOrStdout(), coordapi.VolumeList{Volumes: vols})
			}
			if len(vols) == 0 {
				if impaired {
					fmt.Fprintln(cmd.OutOrStdout(), "no impaired volumes")
				} else {
					fmt.Fprintln(cmd.OutOrStdout(), "no volumes")
				}
				return nil
			}
			printStatus(cmd, vols, time.Now())
			return nil
		},
	}
	cmd.Flags().BoolVar(&impaired, "impaired", false, "list only impaired volumes, cluster-wide")
	return cmd
}

func printStatus(cmd *cobra.Command, vols []coordapi.Volume, now time.Time) {
	w := table(cmd.OutOrStdout())
	fmt.Fprintln(w, "NAME\tID\tSTATE\tSINCE\tEPOCH\tPRIMARY\tMEMBERS\tREASON")
	for _, v := range vols {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", v.Name, v.ID, v.State, since(v.Since, now), v.Epoch, orDash(string(v.Primary)), members(v), v.Reason)
	}
	w.Flush()
}

// members lists a volume's members: an in-sync one by its ID, any other
// with its recovery state and copy progress in brackets, e.g.
// n1,n2[catching_up 12MiB/40MiB 30% ETA 6s],n3[out_of_sync down].
func members(v coordapi.Volume) string {
	out := make([]string, 0, len(v.Members))
	for _, m := range v.Members {
		if m.InSync && m.Live {
			out = append(out, string(m.Node))
			continue
		}
		st := string(m.State)
		if st == "" { // an older coordinator
			st = "out_of_sync"
			if m.InSync {
				st = "in_sync"
			}
		}
		if p := m.Sync; p != nil && p.Total > 0 {
			st += fmt.Sprintf(" %s/%s %d%%", coordapi.FormatBytes(p.Done), coordapi.FormatBytes(p.Total), p.Done*100/p.Total)
			if p.ETA > 0 {
				st += " ETA " + p.ETA.D().Round(time.Second).String()
			}
		}
		if !m.Live {
			st += " down"
		}
		out = append(out, string(m.Node)+"["+st+"]")
	}
	if len(out) == 0 {
		return "-"
	}
	return strings.Join(out, ",")
}

func volumeDelete(o *opts) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME|ID",
		Short: "delete a volume (its nodes close and remove their replicas)",
		Args:  exactlyOne("the volume's name or ID, e.g. keel volume delete data"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer cancel()
			v, err := c.DeleteVolume(ctx, args[0])
			if err != nil {
				return o.explain("volume delete "+args[0], err)
			}
			if o.output == "json" {
				return o.json(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %s (%s)\n", v.Name, v.ID)
			return nil
		},
	}
}

// exactlyOne is cobra.ExactArgs(1) with a message that says what to give.
func exactlyOne(what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != 1 {
			return fmt.Errorf("%s takes one argument (%d given): %s", cmd.CommandPath(), len(args), what)
		}
		return nil
	}
}
