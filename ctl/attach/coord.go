package attach

import (
	"context"
	"fmt"
	"strings"
	"time"

	"keel/ctl/coordclient"
)

// coordLocator asks the coordinator for a volume's primary: the volume
// (its epoch and primary node), then the node list (the primary's NBD
// address). The node serves the volume under the volume's name.
type coordLocator struct {
	c      *coordclient.Client
	volume string
}

// newCoordLocator takes one coordinator URL or several separated by
// commas (the members of a cell).
func newCoordLocator(urls, volume string) (*coordLocator, error) {
	var list []string
	for _, u := range strings.Split(urls, ",") {
		if u = strings.TrimSpace(u); u != "" {
			list = append(list, u)
		}
	}
	c, err := coordclient.New(coordclient.Config{
		URLs: list,
		// The supervisor retries on its own schedule; one call must stay
		// short so that a failover is not held up by a slow member.
		Attempts:       3,
		AttemptTimeout: 3 * time.Second,
		Backoff:        coordclient.Backoff{Base: 100 * time.Millisecond, Max: time.Second},
	})
	if err != nil {
		return nil, err
	}
	return &coordLocator{c: c, volume: volume}, nil
}

// Locate returns the volume's primary. A volume without a primary (a
// handover in progress, or no live in-sync replica) is an error that says
// the volume's state and reason.
func (l *coordLocator) Locate(ctx context.Context) (Target, error) {
	v, err := l.c.Volume(ctx, l.volume)
	if err != nil {
		return Target{}, fmt.Errorf("volume %s: %w", l.volume, err)
	}
	if v.Primary == "" {
		return Target{}, fmt.Errorf("volume %s (epoch %d) has no primary: state %s: %s", l.volume, v.Epoch, v.State, v.Reason)
	}
	nodes, err := l.c.Nodes(ctx)
	if err != nil {
		return Target{}, fmt.Errorf("nodes: %w", err)
	}
	export := v.Name
	if export == "" {
		export = string(v.ID)
	}
	for _, n := range nodes {
		if n.ID == v.Primary {
			return Target{Addr: n.PrimaryAddr, Export: export, Node: string(n.ID), Epoch: uint64(v.Epoch)}, nil
		}
	}
	return Target{}, fmt.Errorf("volume %s: primary node %s is not in the coordinator's node list", l.volume, v.Primary)
}
