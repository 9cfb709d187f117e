// What the copy does with a block it cannot read (seed 001, FIG. 15): abort the backup naming it,
// or write zeros for it, list it as bad, and go on.
import { UserError } from '../util/errors';

export type ErrorPolicy = 'abort' | 'ignore';

export class UnreadableBlockError extends UserError {
  constructor(readonly block: number, readonly offset: number, device: string, errno: number) {
    super(
      `block ${block} (byte offset ${offset}) of ${device} cannot be read (errno ${errno})`,
      'the device has a bad block; rerun with "--on-error ignore" to write zeros for it and list it as bad',
    );
  }
}
