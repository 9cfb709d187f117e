// The tape/tar archive format (issue 4). Entry points for the CLI:
//   backup:  createArchiveSink({ out, recordSize, compress, tapeSize, nextVolumeCommand }) -> BackupSink
//   restore/verify: readArchive(input, { onManifest, onSparseMap, onData }) -> ArchiveSummary
//   inputs:  readFileChunks(path) (file/tape, big reads), readVolumes(paths | { path, nextVolumeCommand }), process.stdin
export { ArchiveError } from './errors';
export { ArchiveSink, createArchiveSink, type ArchiveSinkOptions } from './archive-sink';
export { readArchive, type ArchiveHandler, type ArchiveInput, type ArchiveSummary } from './archive-reader';
export { readFileChunks, readVolumes, changeVolume, type VolumeOptions } from './multi-volume';
export { DEFAULT_RECORD_SIZE, MAX_RECORD_SIZE, checkRecordSize } from './record-writer';
export type { Manifest, Trailer, ChunkRow } from './manifest';
export type { SparseMap } from './sparse-map';
export { requireZstd } from './compress';
