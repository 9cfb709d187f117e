// The hold method on a real ext4 through nbdfuse + loop with churn (the scenario of
// helpers/fs-instant.ts): the image restored passes e2fsck -fn and holds exactly the files of the
// instant, and the writer's changes were held. --hold metadata: the structure is the instant's (e2fsck
// clean, the instant's names), file data may be newer.
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
fsInstantTest('hold metadata: ext4 through nbdfuse + loop with churn during a --freeze backup; restore passes e2fsck -fn, the files of the instant are there and the untouched ones intact', {
  prefix: 'hold-fs-', backupArgs: () => ['--method', 'hold', '--hold', 'metadata'], dataMayBeNewer: true,
  checkDone: (t, done) => { held(t, done); t.true(Number((done.hold as Record<string, unknown>).metadataBlocks) > 0, 'the metadata map was read'); },
});
fsInstantTest('hold metadata + hold log: ext4 through nbdfuse + loop with churn during a --freeze backup; restore passes e2fsck -fn, the files of the instant are there and the untouched ones intact', {
  prefix: 'hold-fs-', backupArgs: (dir) => ['--method', 'hold', '--hold', 'metadata', '--hold-log', `${path.join(dir, 'hold.log')}:128M`], dataMayBeNewer: true,
  checkDone: (t, done) => { held(t, done); t.true(Number((done.hold as Record<string, unknown>).metadataBlocks) > 0, 'the metadata map was read'); },
});
fsInstantTest('hold metadata on XFS (with --freeze): XFS through nbdfuse + loop with churn; restore passes xfs_repair -n, the files of the instant are there and the untouched ones intact', {
  prefix: 'hold-fs-', fs: 'xfs', backupArgs: () => ['--method', 'hold', '--hold', 'metadata'], dataMayBeNewer: true,
  checkDone: (t, done) => { held(t, done); t.true(Number((done.hold as Record<string, unknown>).metadataBlocks) > 0, 'the metadata map was read'); },
});
