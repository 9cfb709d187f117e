// Placeholder until the XFS metadata reader lands: refuses, so --hold metadata holds every write.
import type { BlockReader } from '../device/device';
import type { MetadataMap } from './metadata-map';
import { CorruptFileSystemError } from './used-map';

export async function readXfsMetadata(_reader: BlockReader): Promise<MetadataMap> {
  throw new CorruptFileSystemError('xfs', 'the XFS metadata reader is not built yet');
}
