// Every problem found in an archive: what is wrong, and where (byte offset in the tar stream; for a
// zstd-compressed archive, the offset in the decompressed tar stream).
export class ArchiveError extends Error {
  constructor(message: string, readonly archiveOffset: number, readonly chunk?: number) {
    super(message);
    this.name = 'ArchiveError';
  }
}
