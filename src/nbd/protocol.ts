// Numbers from the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md). Only what livesnap
// speaks: fixed newstyle negotiation, STARTTLS, simple and structured replies, the base:allocation
// metadata context, READ/WRITE/DISC/FLUSH/TRIM/CACHE/WRITE_ZEROES/BLOCK_STATUS.

/** "NBDMAGIC" */
export const NBDMAGIC = Buffer.from('NBDMAGIC', 'latin1');
/** "IHAVEOPT": second word of the greeting and first word of every option request. */
export const IHAVEOPT = Buffer.from('IHAVEOPT', 'latin1');
/** Magic opening every option reply (0x0003e889045565a9). */
export const OPT_REPLY_MAGIC_HI = 0x0003e889;
export const OPT_REPLY_MAGIC_LO = 0x045565a9;

// Handshake flags (server, 16 bits) and client flags (32 bits).
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option reply types.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const ERR = 0x80000000;
export const NBD_REP_ERR_UNSUP = (ERR | 1) >>> 0;
export const NBD_REP_ERR_POLICY = (ERR | 2) >>> 0;
export const NBD_REP_ERR_INVALID = (ERR | 3) >>> 0;
export const NBD_REP_ERR_PLATFORM = (ERR | 4) >>> 0;
export const NBD_REP_ERR_TLS_REQD = (ERR | 5) >>> 0;
export const NBD_REP_ERR_UNKNOWN = (ERR | 6) >>> 0;
export const NBD_REP_ERR_SHUTDOWN = (ERR | 7) >>> 0;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = (ERR | 8) >>> 0;
export const NBD_REP_ERR_TOO_BIG = (ERR | 9) >>> 0;

// NBD_REP_INFO types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags (16 bits).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_CACHE = 1 << 10;

// Requests and simple replies.
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;

// Structured reply chunks.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;

/** The one metadata context of the base namespace, and its flags. */
export const BASE_ALLOCATION = 'base:allocation';
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
/** Most descriptors one BLOCK_STATUS chunk carries (the protocol: SHOULD NOT send more than 2^20). */
export const MAX_BLOCK_STATUS_EXTENTS = 1 << 20;

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// Error values allowed on the wire.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Longest string (export name, context name, error message) the protocol allows. */
export const MAX_STRING_LENGTH = 4096;
/** Longest export name accepted (the spec says servers MAY refuse names over 4096 bytes). */
export const MAX_NAME_LENGTH = 4096;
/** Longest option payload read before the connection is refused. */
export const MAX_OPTION_LENGTH = 65536;
/** Options one connection may send before it is refused (a client looping on options). */
export const MAX_OPTIONS = 1024;

export function commandName(type: number): string {
  switch (type) {
    case NBD_CMD_READ: return 'READ';
    case NBD_CMD_WRITE: return 'WRITE';
    case NBD_CMD_DISC: return 'DISC';
    case NBD_CMD_FLUSH: return 'FLUSH';
    case NBD_CMD_TRIM: return 'TRIM';
    case NBD_CMD_CACHE: return 'CACHE';
    case NBD_CMD_WRITE_ZEROES: return 'WRITE_ZEROES';
    case NBD_CMD_BLOCK_STATUS: return 'BLOCK_STATUS';
    default: return `command ${type}`;
  }
}

export function optionName(opt: number): string {
  const names: Record<number, string> = {
    1: 'EXPORT_NAME', 2: 'ABORT', 3: 'LIST', 4: 'PEEK_EXPORT', 5: 'STARTTLS', 6: 'INFO', 7: 'GO',
    8: 'STRUCTURED_REPLY', 9: 'LIST_META_CONTEXT', 10: 'SET_META_CONTEXT', 11: 'EXTENDED_HEADERS',
  };
  return names[opt] ? `NBD_OPT_${names[opt]}` : `option ${opt}`;
}

/** Maps a system error code (from a backend failure) to the NBD error the client sees. */
export function nbdErrnoFor(code: string | undefined): number {
  switch (code) {
    case 'EPERM': case 'EACCES': case 'EROFS': return NBD_EPERM;
    case 'ENOSPC': case 'EDQUOT': case 'EFBIG': return NBD_ENOSPC;
    case 'EINVAL': return NBD_EINVAL;
    case 'ENOMEM': return NBD_ENOMEM;
    case 'EOVERFLOW': return NBD_EOVERFLOW;
    case 'ENOTSUP': case 'EOPNOTSUPP': return NBD_ENOTSUP;
    case 'ESHUTDOWN': return NBD_ESHUTDOWN;
    default: return NBD_EIO;
  }
}
