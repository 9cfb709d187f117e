// A replica (`--to replica:PATH`) only moves between consistent states. A delta is staged whole in a
// journal, fdatasync'd, sealed by a commit record (a checksum chain over every record) and
// fdatasync'd again; only then is it written in place, the replica fdatasync'd, the new metadata
// renamed in, and the journal removed. A crash before the commit is durable leaves the old state
// and a journal without a valid commit (dropped); after it, re-applying the journal (absolute data,
// idempotent) always gives the new state. Files and steps: README.md in this folder.
export { ReplicaSink } from './replica-sink';
export { recoverReplica, replicaHolding, replicaHolds, replicaStatus, type RecoverResult, type ReplicaStatus } from './replica-apply';
export { JournalDamagedError } from './replica-journal';
