// Package coordapi owns the vocabulary shared by keel's coordinator and its
// clients: node and volume identifiers, epochs and sequence numbers, the lease
// arithmetic both sides must agree on, the request and response types of the
// coordinator's HTTP+JSON API, and its error codes.
//
// It is a leaf: it imports nothing of keel's and does no I/O.
//
// # Endpoints
//
// Every body is JSON (UTF-8, one value). Errors are an [Error] object with
// the HTTP status given by [Error.Status]. Each endpoint belongs to one
// operation [Class]; the coordinator bounds the calls in flight per class and
// sheds the excess with 503 and a Retry-After header, so that a flood of one
// class (say slow volume administration) never stops heartbeats.
//
//	method path                          class         request               response
//	POST   /v1/nodes/register            heartbeat     RegisterRequest       HeartbeatResponse
//	POST   /v1/nodes/heartbeat           heartbeat     HeartbeatRequest      HeartbeatResponse
//	POST   /v1/volumes/{vol}/replica-loss heartbeat    ReplicaLossRequest    Assignment
//	POST   /v1/volumes/{vol}/sync        heartbeat     SyncRequest           SyncGrant
//	POST   /v1/volumes/{vol}/rejoin      heartbeat     RejoinRequest         Assignment
//	GET    /v1/cluster                   read          -                     Cluster
//	GET    /v1/nodes                     read          -                     NodeList
//	POST   /v1/nodes/{node}/drain        node-admin    DrainRequest          Node
//	GET    /v1/volumes[?impaired=1]      read          -                     VolumeList
//	GET    /v1/volumes/{vol}             read          -                     Volume
//	POST   /v1/volumes                   volume-admin  CreateVolumeRequest   Volume
//	DELETE /v1/volumes/{vol}             volume-admin  -                     Volume
//	GET    /v1/config                    read          -                     Config
//	PUT    /v1/config                    node-admin    Config                Config
//	GET    /v1/cell                      read          -                     CellStatus
//	POST   /v1/cell/join                 node-admin    JoinRequest           CellStatus
//	POST   /v1/cell/remove               node-admin    RemoveRequest         CellStatus
//	GET    /metrics                      read          -                     Prometheus text
//
// {vol} is a volume ID ("vol-12") or name; {node} a node ID.
//
// # Epochs and leases
//
// An [Epoch] numbers the configurations of one volume: every change of its
// primary or of its in-sync set takes a new, higher epoch, and a volume has
// at most one primary per epoch. Liveness is a lease per node, renewed by
// heartbeat; the authority of a primary is its node's lease. [Lease] holds
// the arithmetic both sides use and documents why a node always considers
// its lease lapsed before the coordinator may promote another primary.
package coordapi
