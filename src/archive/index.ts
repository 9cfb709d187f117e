// The livesnap archive format (POSIX pax, a GNU sparse 1.0 member, sealed manifest and trailer).
//   write:  createArchiveSink({ out, recordSize, compress, tapeSize, nextVolumeCommand }) -> BackupSink
//           (or new ArchiveSink(streamTarget) for a destination built elsewhere)
//   read:   readArchive(input, { onManifest, onSparseMap, onData }) -> ArchiveSummary
// Destinations and inputs (files, tape, stdout, volume sets, zstd) are byte streams: sink/stream.
export { ArchiveError } from './errors';
export { ArchiveSink, createArchiveSink, type ArchiveFormatOptions, type ArchiveSinkOptions } from './archive-sink';
export { readArchive, type ArchiveHandler, type ArchiveInput, type ArchiveSummary } from './archive-reader';
export type { Manifest, Trailer, ChunkRow } from './manifest';
export type { SparseMap } from './sparse-map';
