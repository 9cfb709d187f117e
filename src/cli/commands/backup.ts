import { Command, Option } from 'clipanion';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { resolveControlPath } from '../../control/protocol';
import { EXPORT_NAME } from '../../export/export-spec';
import * as t from 'typanion';
import { WRITER_PRIORITIES } from '../../snapshot/writer-priority';
import { HOLD_MODES } from '../../snapshot/hold-modes';
import { UserError } from '../../util/errors';
import { parseDuration } from '../../util/duration';
import { formatBytes, formatRate, parseSize } from '../../util/size';
import { LivesnapCommand } from '../base';
import { isS3Url } from '../../s3/location';
import { parseS3Options, type S3Options } from '../../s3/options';
import type { BackupSink } from '../../sink/sink';

export class BackupCommand extends LivesnapCommand {
  static override paths = [['backup']];
  static override usage = Command.Usage({
    description: 'Back up a volume (offline, frozen, or online while served) to an image or archive',
    details: `
      <source> is a device or image file, or the name of an export served by "livesnap serve".
      An export is backed up ONLINE: the snapshot is armed at one instant (optionally inside a
      FIFREEZE of --freeze <mountpoint>), then every write to a block not yet copied is held while
      the original block goes into the intermediate container (--container), and the copier
      drains it; writers are slowed down only when the container is above --high-water.
      The result is exactly the volume at the instant of arming. Ctrl-C cancels it (the export
      keeps serving) unless --detach was given.

      Copies only the blocks the file system uses (read from its own bitmaps, see "livesnap inspect")
      into a sparse raw image the size of the volume: free blocks become holes.

      \`--method hold\` (an export only): from the instant on, the export queues its writes, trims and
      write-zeroes in arrival order instead of writing them (reads see the queued data); the copier
      reads the device directly, no container; at the end the queue is written in order and only then
      is the backup done. Writers are NOT acknowledged while held: with \`--hold all\` (default) every
      write waits for the whole backup; with \`--hold backup-blocks\` only writes to used blocks not yet
      copied wait (the copier takes those blocks next), others go at once; with \`--hold metadata\`
      (ext2/3/4, and XFS with --freeze) only writes to the file system's metadata blocks as of the instant wait
      (superblocks, descriptors, bitmaps, inode tables, btrees, directories, extent trees, the
      journal or log). That promises a file system whose STRUCTURE is one instant (it mounts and
      passes fsck without a journal replay of later work); it does NOT promise file contents of the
      instant: a file written during the backup may hold newer data, or a mix. Other exports are never
      held. When the queue reaches \`--hold-limit\` (default 256M) no write fails: the queue is written in
      order through copy-before-write and the rest of the backup is copy-before-write (--container,
      default memory:64M); the done event says fellBack. Clients: the kernel nbd client fails a write
      held longer than "nbd-client -timeout" (none by default) and warns of hung tasks after 120 s.

      \`--to appliance://HOST:PORT --key FILE\` (an export only): the host copies nothing. At the
      instant it flushes the export's device and tells the appliance ("livesnap appliance", on the
      machine that reads the same SAN LUN); from then on a write to a block whose original is not
      saved yet waits until the appliance has that original (once per block); the appliance reads
      the LUN itself, substitutes the originals and writes the archive (or feeds its --run program).
      The done event carries the appliance's output path, bytes and checksums. If the link drops,
      the appliance dies, or it is silent or holds a write for \`--appliance-timeout\` (default 30s),
      the snapshot is broken at once: writers go on, none fails, the backup fails saying why.

      \`--to s3://BUCKET/KEY\` (any archive backup: offline, online, incremental): the archive goes up
      as an S3 multipart upload while it is made, never staged on local disk; memory is (parts in
      flight + 1) x part size, printed at the start (parts of 16 MiB, 4 at once by default: 80 MiB;
      larger parts when the archive needs them to fit S3's 10,000). The object appears only when the
      upload completes; a failure or Ctrl-C aborts the upload (if the server is unreachable then,
      "livesnap s3 abort s3://BUCKET/KEY" removes the parts later). Credentials, region and endpoint
      as for the AWS CLI: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/{config,
      credentials}, AWS_ENDPOINT_URL (or --s3-endpoint), AWS_CA_BUNDLE; TLS is always verified.

      Incremental backups (an export only). A served export tracks which 64 KiB regions are written
      (its change map, in the state directory, crash-proof: a region's bit is on disk before the
      first write to it is acknowledged). Every online backup starts a new epoch at its instant.
      \`--incremental\` sends only the blocks changed since the export's last completed backup, that
      are used and not excluded, as they were at the instant; the archive's manifest names the
      backup's id and its parent's. The first backup, or one after the map could not be trusted
      (missing, torn, another device, the device written while not served), is full and says why.
      A failed or cancelled backup loses nothing: its changes count for the next one. Restore a
      chain with "livesnap restore full.tar inc1.tar inc2.tar --to X" (ids and order checked).
      \`--to replica://HOST:PORT/NAME --key FILE\` does the same with the replica NAME kept by
      "livesnap appliance --replica NAME=PATH" on another machine, over its TLS-PSK link.
      \`--to replica:PATH\` keeps an image file or device that always holds exactly one snapshot:
      the first run is full, later runs send only the changes, staged in a journal beside it and
      applied only once complete (see "livesnap replica --help").
      \`--exclude PATTERN\` (with --mount or --freeze MOUNTPOINT: where the export's file system is
      mounted) leaves out matching files, and \`--exclude-swap\` (on) swap files: their blocks are
      not sent and read as zeros after a restore; the done event reports the bytes left out.

      Methods:
      - \`offline\` (default): the volume must not be mounted read-write.
      - \`freeze\`: the volume is mounted; its file system is frozen (FIFREEZE) for the whole copy so
        the image is one instant, then thawed (FITHAW) - always, also on error and Ctrl-C. Writers to
        that file system wait meanwhile; other file systems are not affected. The summary reports
        how long it was frozen.

      The target's form picks the format: \`.img\` or a disk gives a raw sparse image (written as
      "<target>.partial" and renamed when complete); \`.tar\`, \`-\` (standard output) and tape devices
      (/dev/nst0) give a POSIX tar archive (manifest.json, disk.img as a GNU sparse file, trailer.json
      with XXH3-128 chunk checksums) that GNU tar and bsdtar extract to the exact image. Archives are
      written in fixed records (\`--record-size\`), optionally zstd-compressed and split over volumes.
      Unreadable blocks: \`--on-error abort\` (default) stops cleanly; \`--on-error ignore\` writes zeros
      for them, lists them as bad blocks and carries on.
    `,
    examples: [
      ['Back up an unmounted volume to a sparse image', '$0 backup /dev/sdb1 --to /backup/sdb1.img'],
      ['Back up a mounted file system, frozen during the copy', '$0 backup /dev/sdb1 --method freeze --mount /srv/data --to /backup/data.img'],
      ['Stream a tar archive to tape, 256 KiB records', '$0 backup /dev/sdb1 --to /dev/nst0 --record-size 256K'],
      ['Compressed archive on standard output', '$0 backup /dev/sdb1 --to - --compress zstd | ssh vault "cat > sdb1.tar.zst"'],
      ['Online backup of a served export while it is in use', '$0 backup data --to /backup/data.img --container memory:256M'],
      ['Online, file system consistent, container on another disk', '$0 backup data --freeze /srv/data --container file:/scratch/cow.bin:4G --to /backup/data.tar'],
      ['Online, the clients first: they keep about half their write speed, the backup takes longer', '$0 backup data --to /backup/data.img --writer-priority high'],
      ['Online, to a backup appliance that reads the shared LUN itself', '$0 backup data --to appliance://10.0.0.2:10810 --key /etc/livesnap/appliance.psk'],
      ['Nightly incremental of a served export (the first one is full)', '$0 backup data --incremental --to /backup/data-$(date +%F).tar'],
      ['Leave out temporary files and caches', '$0 backup data --freeze /srv/data --exclude "tmp/**" --exclude "*.cache" --to /backup/data.tar'],
      ['Keep a replica that only moves between snapshots', '$0 backup data --to replica:/backup/data.replica'],
      ['... or on another machine (livesnap appliance --replica data=PATH there)', '$0 backup data --to replica://10.0.0.2:10810/data --key /etc/livesnap/appliance.psk'],
      ['Straight into object storage (an S3 multipart upload; Ceph RGW, MinIO or AWS)', '$0 backup data --to s3://backups/data-$(date +%F).tar --s3-endpoint https://rgw.example.com'],
      ['Before a backup program runs livesnap: would this backup be refused? (exit 1 and why, or 0)', '$0 backup /dev/sdb1 --to - --check'],
      ['Keep going past bad blocks', '$0 backup /dev/sdc --to /backup/sdc.img --on-error ignore'],
    ],
  });

  source = Option.String({ name: 'source' });
  to = Option.String('--to', { required: true, description: 'Target: an image file (.img), a block device, an archive (.tar, -, a tape device, s3://BUCKET/KEY), replica:PATH, appliance://HOST:PORT' });
  s3Endpoint = Option.String('--s3-endpoint', { description: 'With --to s3://: the S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS itself)' });
  s3PartSize = Option.String('--s3-part-size', { description: 'With --to s3://: the smallest upload part (default 16M; at least 5M)' });
  s3Parallel = Option.String('--s3-parallel', { description: 'With --to s3://: parts uploaded at once (default 4)' });
  method = Option.String('--method', 'offline', { description: 'offline | freeze (devices); hold (an export: queue writes during the backup instead of copy-before-write)', validator: t.isEnum(['offline', 'freeze', 'hold'] as const) });
  hold = Option.String('--hold', { description: 'With --method hold: all (default: every write waits for the end) | backup-blocks (only writes to used blocks not yet copied wait, briefly) | metadata (only writes to file-system metadata wait: the structure is one instant, file data may be newer)', validator: t.isEnum(HOLD_MODES) });
  holdLog = Option.String('--hold-log', { description: 'With --method hold: PATH[:SIZE] (default 1G) of a durable log on ANOTHER fast device: held writes are appended (fdatasync) and acknowledged at once, replayed in order at the end; after a crash "livesnap serve" replays it' });
  holdLimit = Option.String('--hold-limit', { description: 'With --method hold: the most held write data in memory (default 256M); beyond it the backup goes on as copy-before-write, no write fails' });
  mount = Option.String('--mount', { description: 'Mount point of the source (with --method freeze)' });
  onError = Option.String('--on-error', 'abort', { description: 'abort | ignore: what to do with unreadable blocks', validator: t.isEnum(['abort', 'ignore'] as const) });
  maxRate = Option.String('--max-rate', { description: 'Read at most this much per second (e.g. 200M), to leave the disk to production I/O' });
  force = Option.Boolean('--force', false, { description: 'Overwrite an existing target file' });
  recordSize = Option.String('--record-size', { description: 'Archive: bytes per write to the target (default 10240, up to 1M; tape drives like 256K)' });
  compress = Option.String('--compress', { description: 'Archive: zstd', validator: t.isEnum(['zstd'] as const) });
  tapeSize = Option.String('--tape-size', { description: 'Archive: split into volumes of this size (e.g. 400G)' });
  nextVolume = Option.String('--next-volume-command', { description: 'Archive: shell command run between volumes ($LIVESNAP_VOLUME = next number); without it, asks on the terminal' });
  container = Option.String('--container', { description: 'Online: intermediate container: memory:SIZE (default memory:64M), file:PATH[:SIZE], partition:DEVICE' });
  freeze = Option.String('--freeze', { description: 'Online: mount point to freeze (FIFREEZE) for the instant of arming' });
  highWater = Option.String('--high-water', { description: 'Online: container fill (percent) above which writers are slowed down (default 80)' });
  writerPriority = Option.String('--writer-priority', { description: 'Online: auto (default) | high | normal | low: how much of the disk the backup leaves to clients while they write. auto keeps them at about half the write rate they had before the backup (or, when they start during it, slows down while they write without pause) and goes as fast as that allows; high: one 32 KiB read at a time (clients keep about half their speed, the backup may take 10x longer); low: full speed (the backup takes about its idle time, clients slow down a lot); normal: in between', validator: t.isEnum(WRITER_PRIORITIES) });
  writeWaitLimit = Option.String('--write-wait-limit', { description: 'Online: the longest a client write may wait on the snapshot before the backup is abandoned and writers go on (default 30s; e.g. 10s, 2m)' });
  detach = Option.Boolean('--detach', false, { description: 'Online: return once armed; the job goes on in the daemon' });
  control = Option.String('--control', { description: 'Online: daemon control socket' });
  key = Option.String('--key', { description: 'With --to appliance://HOST:PORT: the PSK file shared with the appliance (livesnap keygen)' });
  applianceTimeout = Option.String('--appliance-timeout', { description: 'With --to appliance://: break the snapshot (writers go on, the backup fails) when the appliance is silent, or holds a write, this long (default 30s)' });
  incremental = Option.Boolean('--incremental', false, { description: 'Online: only the blocks changed since the export\'s last backup (and used, and not excluded), as an archive whose manifest names its parent; the first backup is full, and says so. Restore a chain with "livesnap restore full.tar d1.tar d2.tar --to X"' });
  exclude = Option.Array('--exclude', { description: 'Online: leave out files matching PATTERN (relative to --mount/--freeze; "*", "**", "?"; repeatable): their blocks are not sent and read as zeros after a restore' });
  excludeSwap = Option.Boolean('--exclude-swap', true, { description: 'Online: leave out swap files of the mounted file system (default on; --no-exclude-swap keeps them)' });
  check = Option.Boolean('--check', false, { description: 'Check only: every refusal a backup would make (source missing, mounted read-write, served, target exists, no such export, a backup already running), then exit 0 without copying (for a backup program\'s run-before step)' });
  format = Option.String('--format', { description: 'raw | tar (default: from the target: .img raw; .tar, - and tape devices tar)', validator: t.isEnum(['raw', 'tar'] as const) });

  /** --s3-*: checked whatever the target, so a stray one is an error rather than ignored. */
  private s3Options(): S3Options | undefined {
    const given = this.s3Endpoint !== undefined || this.s3PartSize !== undefined || this.s3Parallel !== undefined;
    if (!given) return undefined;
    if (!isS3Url(this.to)) throw new UserError(`${this.s3Endpoint !== undefined ? '--s3-endpoint' : this.s3PartSize !== undefined ? '--s3-part-size' : '--s3-parallel'} goes with --to s3://BUCKET/KEY`);
    return parseS3Options({ endpoint: this.s3Endpoint, partSize: this.s3PartSize, parallel: this.s3Parallel });
  }

  /** --check of an export: the daemon serves it and no backup of it is running. */
  private async checkOnline(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { call } = require('../../control/client') as typeof import('../../control/client');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const res = await call(resolveControlPath(this.control), { op: 'status' });
    const exp = (res.exports as Array<{ name: string; job: { id: string } | null }>).find((e) => e.name === this.source);
    if (!exp) throw new UserError(`no export named "${this.source}" is served`, '"livesnap status" lists the exports');
    if (exp.job) throw new UserError(`export ${this.source} has a backup running (job ${exp.job.id})`, 'wait for it, or "livesnap cancel JOB"');
    this.reporter.done({ check: true, export: this.source, to: this.to }, [`check ok: export ${this.source} is served and idle (nothing copied)`]);
    return 0;
  }

  private online(): Promise<number> {
    if (this.check) return this.checkOnline();
    if (this.to.startsWith('appliance://')) return this.toAppliance();
    const remoteReplica = this.to.startsWith('replica://');
    if (!remoteReplica && (this.key !== undefined || this.applianceTimeout !== undefined)) throw new UserError(`${this.key !== undefined ? '--key' : '--appliance-timeout'} goes with --to appliance://HOST:PORT or replica://HOST:PORT/NAME`);
    if (remoteReplica) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- checked here for the message, parsed again by the daemon
      (require('../../appliance/remote-replica') as typeof import('../../appliance/remote-replica')).parseReplicaUrl(this.to);
      if (this.key === undefined) throw new UserError(`--to ${this.to} needs --key FILE`, 'the PSK file the appliance was started with (livesnap keygen FILE, copied to both machines)');
    }
    if (this.method !== 'offline' && this.method !== 'hold') throw new UserError('--method offline|freeze are for devices; an online backup of an export uses --freeze <mountpoint> (and --method hold to queue writes instead of copy-before-write)');
    if (this.mount !== undefined && this.freeze !== undefined) throw new UserError('--mount and --freeze both name the mount point: give one (--freeze also freezes it at the instant)');
    const mount = this.mount !== undefined ? path.resolve(this.mount) : undefined;
    const hold = this.method === 'hold';
    if (!hold && (this.hold !== undefined || this.holdLimit !== undefined || this.holdLog !== undefined)) throw new UserError(`${this.hold !== undefined ? '--hold' : this.holdLog !== undefined ? '--hold-log' : '--hold-limit'} goes with --method hold`, 'add --method hold, or drop the option');
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- checked here for the message, parsed again by the daemon
    if (this.holdLog !== undefined) (require('../../export/hold-log') as typeof import('../../export/hold-log')).parseHoldLog(this.holdLog);
    const holdLimit = this.holdLimit !== undefined ? parseSize(this.holdLimit, '--hold-limit') : undefined;
    if (holdLimit !== undefined && holdLimit < 1) throw new UserError(`--hold-limit ${this.holdLimit}: give a size of at least 1 byte`, 'e.g. --hold-limit 256M');
    const hw = this.highWater !== undefined ? Number(this.highWater) : undefined;
    if (hw !== undefined && !(hw > 0 && hw <= 100)) throw new UserError(`--high-water ${this.highWater}: give a percentage between 1 and 100`);
    const s3 = this.s3Options();
    if (isS3Url(this.to)) {
      // The daemon streams the archive to this command (as for --to -), which uploads it with its own credentials.
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on use (startup time)
      (require('../../jobs/open-target') as typeof import('../../jobs/open-target')).checkTargetOptions(this.to, { format: this.format, tapeSize: this.tapeSize !== undefined ? 1 : undefined, detach: this.detach, compress: this.compress });
    }
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on use (startup time)
    const { runOnlineBackupViaDaemon } = require('../online-backup') as typeof import('../online-backup');
    return runOnlineBackupViaDaemon(resolveControlPath(this.control), {
      op: 'backup',
      export: this.source,
      to: this.to,
      format: this.format,
      force: this.force,
      container: this.container,
      freeze: this.freeze,
      onError: this.onError,
      highWater: hw !== undefined ? hw / 100 : undefined,
      recordSize: this.recordSize !== undefined ? parseSize(this.recordSize, '--record-size') : undefined,
      compress: this.compress,
      tapeSize: this.tapeSize !== undefined ? parseSize(this.tapeSize, '--tape-size') : undefined,
      nextVolumeCommand: this.nextVolume,
      detach: this.detach,
      maxRate: this.maxRate !== undefined ? parseSize(this.maxRate, '--max-rate') : undefined,
      writerPriority: this.writerPriority,
      writeWaitLimitMs: this.writeWaitLimit !== undefined ? parseDuration(this.writeWaitLimit, '--write-wait-limit') : undefined,
      incremental: this.incremental || undefined,
      exclude: this.exclude?.length ? this.exclude : undefined,
      excludeSwap: this.excludeSwap,
      mount,
      ...(remoteReplica ? { key: path.resolve(this.key!), applianceTimeoutMs: this.applianceTimeout !== undefined ? parseDuration(this.applianceTimeout, '--appliance-timeout') : undefined } : {}),
      ...(hold ? { method: 'hold' as const, hold: this.hold, holdLimit, holdLog: this.holdLog !== undefined ? path.resolve(this.holdLog) : undefined } : {}),
    }, this.reporter, { s3 });
  }

  /** --to appliance://HOST:PORT: the host only saves originals; the appliance reads the LUN and writes the output. */
  private toAppliance(): Promise<number> {
    const addr = this.to.slice('appliance://'.length).replace(/\/$/, '');
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- checked here for the message, parsed again by the daemon
    (require('../../appliance/link') as typeof import('../../appliance/link')).parseApplianceAddress(addr, `--to ${this.to}`);
    if (this.key === undefined) throw new UserError('--to appliance:// needs --key FILE', 'the PSK file the appliance was started with (livesnap keygen FILE, copied to both machines)');
    const notHere: Array<[string, unknown]> = [['--container', this.container], ['--format', this.format], ['--compress', this.compress], ['--record-size', this.recordSize], ['--tape-size', this.tapeSize],
      ['--next-volume-command', this.nextVolume], ['--max-rate', this.maxRate], ['--writer-priority', this.writerPriority], ['--high-water', this.highWater], ['--hold', this.hold], ['--hold-log', this.holdLog],
      ['--hold-limit', this.holdLimit], ['--write-wait-limit', this.writeWaitLimit], ['--mount', this.mount]];
    for (const [flag, v] of notHere) if (v !== undefined) throw new UserError(`${flag} does not go with --to appliance://: the appliance reads the LUN and writes the output itself`, flag === '--write-wait-limit' ? 'use --appliance-timeout' : 'drop the option (the appliance\'s own options decide the output)');
    if (this.incremental || this.exclude?.length || this.mount !== undefined) throw new UserError(`${this.incremental ? '--incremental' : this.mount !== undefined ? '--mount' : '--exclude'} does not go with --to appliance:// (the appliance reads the whole LUN)`);
    if (this.method !== 'offline') throw new UserError('--method does not go with --to appliance:// (the host saves originals for the appliance: copy-before-write)');
    if (this.force || this.onError !== 'abort') throw new UserError(`${this.force ? '--force' : '--on-error'} does not go with --to appliance://`);
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on use (startup time)
    const { runOnlineBackupViaDaemon } = require('../online-backup') as typeof import('../online-backup');
    return runOnlineBackupViaDaemon(resolveControlPath(this.control), {
      op: 'backup', export: this.source, to: this.to, onError: 'abort', freeze: this.freeze, detach: this.detach,
      key: path.resolve(this.key),
      applianceTimeoutMs: this.applianceTimeout !== undefined ? parseDuration(this.applianceTimeout, '--appliance-timeout') : undefined,
    }, this.reporter);
  }

  protected override dataOnStdout(): boolean {
    return this.to === '-';
  }

  async run(): Promise<number> {
    // A name without a slash is an export of the daemon; a device or file is named by a path
    // (/dev/sdb1, ./vol.img): the choice is never made by what happens to exist in this directory.
    if (!this.source.includes('/')) {
      if (!EXPORT_NAME.test(this.source)) throw new UserError(`"${this.source}" is neither a path nor an export name`, 'name a device or file by its path (e.g. ./vol.img or /dev/sdb1), or an export by its name');
      return this.online().catch((e: unknown) => {
        if (e instanceof UserError && fs.existsSync(this.source) && /no export named|no livesnap daemon/.test(e.message)) {
          throw new UserError(e.message, `"${this.source}" is taken as an export name; to back up the file or device "${this.source}" in this directory, write ./${this.source}`, e.exitCode);
        }
        throw e;
      });
    }
    for (const [flag, v] of [['--write-wait-limit', this.writeWaitLimit], ['--container', this.container], ['--freeze', this.freeze], ['--high-water', this.highWater], ['--writer-priority', this.writerPriority], ['--control', this.control]] as const) {
      if (v !== undefined) throw new UserError(`${flag} is for online backups of a served export, and ${this.source} is a device or file`, 'serve it with "livesnap serve" and back up the export by name, or drop the option');
    }
    if (this.detach) throw new UserError('--detach is for online backups of a served export');
    if (this.incremental || this.exclude?.length) throw new UserError(`${this.incremental ? '--incremental' : '--exclude'} is for online backups of a served export (its change map and mounted file system), and ${this.source} is a device or file`, 'serve it with "livesnap serve" and back up the export by name');
    if (this.to.startsWith('replica:')) throw new UserError(`--to replica:PATH keeps a replica of a served export, and ${this.source} is a device or file`, 'serve it, then "livesnap backup <name> --to replica:PATH"');
    if (this.to.startsWith('appliance://')) throw new UserError(`--to appliance:// backs up an export served by "livesnap serve", and ${this.source} is a device or file`, 'serve it, then "livesnap backup <name> --to appliance://HOST:PORT --key FILE"');
    if (this.key !== undefined || this.applianceTimeout !== undefined) throw new UserError(`${this.key !== undefined ? '--key' : '--appliance-timeout'} goes with --to appliance://HOST:PORT`);
    if (this.method === 'hold' || this.hold !== undefined || this.holdLimit !== undefined || this.holdLog !== undefined) throw new UserError(`--method hold is for online backups of a served export, and ${this.source} is a device or file`, 'serve it with "livesnap serve" and back up the export by name');
    if (this.method === 'freeze' && !this.mount) throw new UserError('--method freeze needs --mount <mountpoint>', 'name the directory where the source is mounted, e.g. --mount /srv/data');
    if (this.method !== 'freeze' && this.mount) throw new UserError('--mount only goes with --method freeze');
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { runBackup } = require('../../jobs/backup') as typeof import('../../jobs/backup');
    const { openSource, refuseTargetOnSource } = require('../../jobs/source') as typeof import('../../jobs/source');
    const { openBackupTarget } = require('../../jobs/open-target') as typeof import('../../jobs/open-target');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const { refuseServed } = require('../../jobs/served-check') as typeof import('../../jobs/served-check'); // eslint-disable-line @typescript-eslint/no-require-imports
    await refuseServed(this.source, 'source');
    if (!isS3Url(this.to)) await refuseServed(this.to, 'target');
    if (this.to !== '-' && !isS3Url(this.to) && fs.existsSync(`${this.to}.partial`)) this.reporter.info(`note: replacing ${this.to}.partial, left by a backup that did not finish`);
    const source = openSource(this.source, this.method);
    // This process serves nothing: a signal or an exit during the freeze window thaws at once.
    const unguard = this.method === 'freeze' ? guardFrozen() : () => {};
    try {
      refuseTargetOnSource(source, this.to);
      const sink = openBackupTarget(this.to, {
        force: this.force,
        format: this.format,
        recordSize: this.recordSize !== undefined ? parseSize(this.recordSize, '--record-size') : undefined,
        compress: this.compress,
        tapeSize: this.tapeSize !== undefined ? parseSize(this.tapeSize, '--tape-size') : undefined,
        nextVolumeCommand: this.nextVolume,
        s3: this.s3Options(),
        note: (n) => this.reporter.info(`note: ${n}`),
      });
      const r = this.reporter;
      // --check: every refusal is made by now (the sink opens nothing before its first byte).
      if (this.check) {
        r.done({ check: true, source: this.source, to: this.to, size: source.size }, [`check ok: ${this.source} can be backed up to ${this.to} (nothing copied)`]);
        return 0;
      }
      if (isS3Url(this.to)) abortOnSignal(sink);
      r.info(`backing up ${this.source} to ${sink.description} (${this.method})`);
      const summary = await runBackup({
        source,
        sink,
        method: this.method,
        mount: this.mount,
        onError: this.onError,
        maxRate: this.maxRate !== undefined ? parseSize(this.maxRate, '--max-rate') : undefined,
        onMap: (m) => {
          r.event('map', { filesystem: m.filesystem, blockSize: m.blockSize, totalBlocks: m.totalBlocks, usedBlocks: m.usedBlocks, notes: m.notes });
          for (const n of m.notes) r.info(`note: ${n}`);
        },
        onProgress: (done, total, bad) => r.progress('backup', done, total, `${formatBytes(done)}/${formatBytes(total)}${bad ? ` bad:${bad}` : ''}`),
      });
      r.done(
        { ...summary, badBlockCount: summary.badBlocks.length },
        [
          `backup complete: ${this.source} -> ${this.to}`,
          `  file system   ${summary.filesystem}, ${summary.blockSize}-byte blocks, ${summary.usedBlocks} of ${summary.totalBlocks} used`,
          `  copied        ${formatBytes(summary.bytes)} in ${(summary.copyMs / 1000).toFixed(2)} s (${formatRate(summary.bytes, summary.copyMs)})`,
          ...(summary.freezeMs !== undefined ? [`  frozen        ${summary.freezeMs.toFixed(0)} ms (${this.mount})`] : []),
          `  bad blocks    ${summary.badBlocks.length ? summary.badBlocks.slice(0, 20).join(', ') + (summary.badBlocks.length > 20 ? ', ...' : '') + ' (written as zeros)' : 'none'}`,
          ...layoutLines(summary.layout),
        ],
      );
      return 0;
    } finally {
      unguard();
      source.close();
    }
  }
}

/** The disk's layout tree for the summary (loaded on use: startup time). */
function layoutLines(layout: import('../../fs/layout').LayoutNode | undefined): string[] {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return (require('../../fs/layout') as typeof import('../../fs/layout')).layoutSummaryLines(layout);
}

/** Thaws what this CLI froze on exit and on SIGINT/SIGTERM/SIGHUP (which then end the backup). */
function guardFrozen(): () => void {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { thawAllNowSync } = require('../../snapshot/freeze') as typeof import('../../snapshot/freeze');
  const onExit = () => { thawAllNowSync(); };
  const onSignal = (sig: NodeJS.Signals) => {
    const thawed = thawAllNowSync();
    process.stderr.write(`\nlivesnap: ${sig}: ${thawed.length ? `${thawed.join(', ')} thawed, ` : ''}backup cancelled\n`);
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.on('exit', onExit);
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(s, onSignal);
  return () => {
    process.off('exit', onExit);
    for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.off(s, onSignal);
  };
}

/** Ctrl-C or a kill during an upload to S3: abort the multipart upload before exiting, so no parts stay behind. */
function abortOnSignal(sink: BackupSink): void {
  const onSignal = (sig: NodeJS.Signals) => {
    process.stderr.write(`\nlivesnap: ${sig}: backup cancelled, aborting the S3 upload\n`);
    void sink.abort(new Error('cancelled')).finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
  };
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.once(s, onSignal);
}
