import { Command, Option } from 'clipanion';
import { UserError } from '../../util/errors';
import { formatBytes } from '../../util/size';
import { LivesnapCommand } from '../base';
import { isS3Url } from '../../s3/location';
import { parseS3Options, type S3Options } from '../../s3/options';

export class VerifyCommand extends LivesnapCommand {
  static override paths = [['verify']];
  static override usage = Command.Usage({
    description: 'Check a backup: an archive\'s checksums, or an image/archive against a device',
    details: `
      For an archive (file, tape or "-"), reads it all without writing anything and checks every
      header, the manifest, the sparse map, every chunk checksum and the trailer; with --against it
      also compares the stored data with the device.

      Compares every block the backup stored (the used blocks of the image's file system) with the
      same block on the device. Exit status 0 when all match; 1 with the first differing block and
      the count otherwise.

      Several archives are a chain (a full backup, then its incrementals in order): every archive is
      checked whole, and so is the chain (each incremental's parent is the backup before it, all of
      one volume).
    `,
    examples: [
      ['Check an image against its source', '$0 verify /backup/sdb1.img --against /dev/sdb1'],
      ['Check an archive on tape', '$0 verify /dev/nst0'],
      ['Check a chain: the full backup and its incrementals, in order', '$0 verify full.tar inc1.tar inc2.tar'],
      ['Check an archive in object storage (ranged GETs, every chunk checked)', '$0 verify s3://backups/data.tar --s3-endpoint https://rgw.example.com'],
    ],
  });

  image = Option.String({ name: 'image' });
  more = Option.Rest({ name: 'incremental' });
  against = Option.String('--against', { description: 'Device (or image) to compare with' });
  raw = Option.Boolean('--raw', false, { description: 'The image is raw and of unknown contents: compare every block' });

  nextVolume = Option.String('--next-volume-command', { description: 'Archive on several volumes: shell command run before each next one ($LIVESNAP_VOLUME)' });
  s3Endpoint = Option.String('--s3-endpoint', { description: 'An s3://BUCKET/KEY archive: the S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS itself)' });

  private s3(): S3Options | undefined {
    if (this.s3Endpoint === undefined) return undefined;
    if (![this.image, ...this.more].some(isS3Url)) throw new UserError('--s3-endpoint goes with an s3://BUCKET/KEY archive');
    return parseS3Options({ endpoint: this.s3Endpoint });
  }

  async run(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { verifyImage } = require('../../jobs/restore') as typeof import('../../jobs/restore');
    const { classifyBackup } = require('../../jobs/backup-kind') as typeof import('../../jobs/backup-kind');
    /* eslint-enable @typescript-eslint/no-require-imports */
    if (this.more.length) return this.verifyChain();
    if ((await classifyBackup(this.image, { raw: this.raw })) === 'archive') return this.verifyArchive();
    if (!this.against) throw new UserError('a raw image carries no checksums: verify needs --against <device>', `e.g. livesnap verify ${this.image} --against /dev/sdb1`);
    const r = this.reporter;
    const res = await verifyImage({ image: this.image, against: this.against, onProgress: (d, t) => r.progress('verify', d, t, `${formatBytes(d)}/${formatBytes(t)}`) });
    const ok = res.differingBlocks === 0;
    r.done(
      { image: this.image, against: this.against, match: ok, differingBlocks: res.differingBlocks, firstDifferingBlock: res.firstDifferingBlock ?? null, blockSize: res.map.blockSize, comparedBytes: res.bytes, durationMs: res.durationMs },
      ok
        ? [`verify ok: ${this.image} matches ${this.against} on all ${res.map.usedBlocks} used blocks (${formatBytes(res.bytes)})`]
        : [`verify FAILED: ${res.differingBlocks} of ${res.map.usedBlocks} used blocks differ; first differing block ${res.firstDifferingBlock} (byte offset ${res.firstDifferingBlock! * res.map.blockSize}, ${res.map.blockSize}-byte blocks)`],
    );
    return ok ? 0 : 1;
  }

  private async verifyChain(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { verifyArchive } = require('../../jobs/archive-restore') as typeof import('../../jobs/archive-restore');
    const { peekManifest, linkOf } = require('../../jobs/chain-restore') as typeof import('../../jobs/chain-restore');
    const { checkChain } = require('../../incremental/chain') as typeof import('../../incremental/chain');
    /* eslint-enable @typescript-eslint/no-require-imports */
    if (this.against !== undefined) throw new UserError('--against compares one backup with a device, not a chain', 'restore the chain to a scratch file and compare that, or verify the last archive alone');
    const inputs = [this.image, ...this.more];
    if (inputs.includes('-')) throw new UserError('a chain is verified from archive files, not standard input');
    const links = [];
    for (const f of inputs) links.push(linkOf(f, await peekManifest(f, this.s3())));
    checkChain(links);
    const r = this.reporter;
    let chunks = 0;
    for (const f of inputs) chunks += (await verifyArchive({ input: f, s3: this.s3(), onNote: (n: string) => this.reporter.info(`note: ${n}`), onProgress: (d, t) => r.progress('verify', d, t, `${f}: ${formatBytes(d)}/${formatBytes(t)}`) })).chunksVerified;
    r.done({ images: inputs, format: 'tar', match: true, chain: links.map((l) => ({ id: l.id ?? null, parent: l.parent ?? null, kind: l.kind ?? 'full', snapshotTime: l.snapshotTime })), chunksVerified: chunks },
      [`chain ok: ${inputs.length} archives, each incremental follows the one before it; ${chunks} chunk checksums verified; restores the volume as at ${links[links.length - 1]!.snapshotTime}`]);
    return 0;
  }

  private async verifyArchive(): Promise<number> {
    /* eslint-disable @typescript-eslint/no-require-imports -- loaded on use (startup time) */
    const { verifyArchive } = require('../../jobs/archive-restore') as typeof import('../../jobs/archive-restore');
    /* eslint-enable @typescript-eslint/no-require-imports */
    const r = this.reporter;
    const s = await verifyArchive({
      input: this.image,
      s3: this.s3(), onNote: (n: string) => this.reporter.info(`note: ${n}`),
      against: this.against,
      nextVolumeCommand: this.nextVolume,
      onProgress: (d, t) => r.progress('verify', d, t, `${formatBytes(d)}/${formatBytes(t)}`),
    });
    const ok = s.differingBlocks === 0;
    const m = s.manifest;
    r.done(
      { image: this.image, format: 'tar', against: this.against ?? null, match: ok, chunksVerified: s.chunksVerified, differingBlocks: s.differingBlocks, firstDifferingBlock: s.firstDifferingBlock ?? null, compareBlockSize: s.compareBlockSize, status: s.trailer.status, badBlocks: s.trailer.badBlocks, volumeSize: m.volumeSize, storedBytes: m.storedBytes },
      [
        `archive ok: ${s.chunksVerified} chunk checksums verified, ${formatBytes(m.storedBytes)} of ${m.filesystem} volume ${m.source} taken ${m.snapshotTime}`,
        ...(this.against ? [ok ? `  matches ${this.against} on every stored block` : `  FAILED: ${s.differingBlocks} 512-byte sectors differ from ${this.against}; first at sector ${s.firstDifferingBlock} (byte ${s.firstDifferingBlock! * 512})`] : []),
      ],
    );
    return ok ? 0 : 1;
  }
}
