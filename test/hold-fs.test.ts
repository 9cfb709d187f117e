// The hold method on a real ext4 through nbdfuse + loop with churn (the scenario of
// helpers/fs-instant.ts): the image restored passes e2fsck -fn and holds exactly the files of the
// instant, and the writer's changes were held.
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { fsInstantTest } from './helpers/fs-instant';

function held(t: ExecutionContext, done: Record<string, unknown>): void {
  t.is(done.method, 'hold');
  t.true(Number(done.heldWrites) > 0, 'the writer\'s writes were held');
  t.log(`hold: ${JSON.stringify(done.hold)}`);
}

fsInstantTest('hold all + hold log: ext4 through nbdfuse + loop with churn during a --freeze backup; restore passes e2fsck -fn, every file of the instant is intact', {
  prefix: 'hold-fs-', backupArgs: (dir) => ['--method', 'hold', '--hold-log', `${path.join(dir, 'hold.log')}:128M`], checkDone: held,
});
fsInstantTest('hold backup-blocks: ext4 through nbdfuse + loop with churn during a --freeze backup; restore passes e2fsck -fn, every file of the instant is intact', {
  prefix: 'hold-fs-', backupArgs: () => ['--method', 'hold', '--hold', 'backup-blocks'], checkDone: held,
});
