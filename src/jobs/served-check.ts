// Outside the daemon, a served volume is known by the lock its export holds: nothing livesnap runs
// may write a served device or file (a restore, an offline target), nor copy one offline (that would
// be a smear of many instants, not one).
import { identify, lockedPath } from '../device/identity';
import { UserError } from '../util/errors';

export type Role = 'source' | 'target' | 'restore destination';

export async function refuseServed(p: string, role: Role): Promise<void> {
  if (p === '-' || p === '/dev/null') return;
  const held = await lockedPath(await identify(p));
  if (held === undefined) return;
  const via = held === p ? '' : ` (through ${held})`;
  if (role === 'source') {
    throw new UserError(
      `${p} is served by livesnap${via}: an offline copy of a volume that is being written would not be one instant`,
      'back it up online by its export name ("livesnap backup <export> --to ..."; "livesnap status" lists the exports)',
    );
  }
  throw new UserError(
    `the ${role} ${p} is a volume served by livesnap${via}: writing it would replace live data under its clients`,
    'choose another target, or stop the export first ("livesnap stop <export>")',
  );
}
