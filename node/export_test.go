package node

// DataSum exports dataSum to the external tests (package node_test).
var DataSum = dataSum
