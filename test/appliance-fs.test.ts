// A real ext4 through nbdfuse + loop, with churn, backed up by the appliance (two hosts, see
// helpers/appliance.ts): the archive it writes, restored, passes e2fsck -fn and holds exactly the
// files of the instant.
import * as path from 'node:path';
import { keyFile, startAppliance, twoHosts } from './helpers/appliance';
import { fsInstantTest } from './helpers/fs-instant';
import { loopDevice } from './helpers/system';

fsInstantTest(
  'ext4 through nbdfuse + loop with churn, backed up by the appliance from the shared LUN: the restored archive passes e2fsck -fn, every file of the instant is intact',
  {
    prefix: 'appliance-fs-',
    backupArgs: () => [],
    target: async (t, { dir, vol }) => {
      const ns = twoHosts(t);
      const key = await keyFile(dir);
      const lun = loopDevice(t, vol, { readOnly: true, directIo: true });
      const ap = await startAppliance(t, ns, { key, luns: { fsvol: lun }, store: path.join(dir, 'store'), args: ['--max-rate', '64M'] });
      t.teardown(() => { if (!t.passed) t.log(ap.log()); });
      return { to: `appliance://${ap.address}`, args: ['--key', key], backupOf: (done) => String(done.output) };
    },
    checkDone: (t, done) => {
      t.is(done.method, 'appliance');
      t.true(Number(done.blocksSavedByWriters) > 0, 'the writer\'s first writes sent originals');
    },
  },
);
