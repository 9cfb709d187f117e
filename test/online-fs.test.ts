// Online (copy-before-write) backup of a real ext4 through nbdfuse + loop with churn: the scenario
// of helpers/fs-instant.ts.
import { fsInstantTest } from './helpers/fs-instant';

fsInstantTest(
  'ext4 through nbdfuse + loop, files created/overwritten/deleted during a --freeze online backup: restore passes e2fsck -fn, every file of the instant is intact',
  { prefix: 'online-fs-', backupArgs: () => ['--container', 'memory:8M'] },
);
