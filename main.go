// Command keel is one static binary for every keel process: the storage
// node, the coordinator, operator and host commands, and the benchmarks.
// It only wires the cobra commands that the node, ctl and bench packages
// define.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"keel/bench"
	"keel/ctl/attach"
	"keel/ctl/cli"
	"keel/ctl/coordsvc"
	"keel/node"
)

func main() {
	root := &cobra.Command{
		Use:           "keel",
		Short:         "keel: network block volumes over NBD, replicated, with a coordinator",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	nodeCmd := node.NodeCommand()
	nodeCmd.AddCommand(cli.NodeAdminCommands()...)
	nodeCmd.AddCommand(node.ThrottleCommand())
	root.AddCommand(
		node.ServeCommand(),
		nodeCmd,
		node.UpCommand(),
		coordsvc.CoordCommand(),
		cli.VolumeCommand(),
		cli.ClusterCommand(),
		bench.Command(),
	)
	root.AddCommand(attach.Commands()...)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "keel:", err)
		os.Exit(1)
	}
}
