// Hooks a served volume's NBD backend into the snapshot layer: every WRITE, TRIM and WRITE_ZEROES
// passes SnapshotGate.beforeChange (the one copy-before-write decision) first; reads pass straight.
// Wrap once when the export is created; backups attach and detach themselves to the gate.
import { type NbdBackend, withWriteInterceptor } from '../nbd/backend';
import { SnapshotGate } from './cbw';

export interface InterceptedExport {
  backend: NbdBackend;
  gate: SnapshotGate;
}

export function interceptBackend(inner: NbdBackend, gate = new SnapshotGate()): InterceptedExport {
  return { backend: withWriteInterceptor(inner, gate), gate };
}
