// strerrorname_np arrived in glibc 2.32; the addon must stay within glibc 2.28 symbols,
// so the names the TypeScript side acts on are spelled out here.
#pragma once
#include <cerrno>
namespace livesnap {
inline const char* strerrorname_np_compat(int e) {
  switch (e) {
    case EPERM: return "EPERM"; case ENOENT: return "ENOENT"; case EIO: return "EIO";
    case ENXIO: return "ENXIO"; case EBADF: return "EBADF"; case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM"; case EACCES: return "EACCES"; case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY"; case EEXIST: return "EEXIST"; case ENODEV: return "ENODEV";
    case ENOTDIR: return "ENOTDIR"; case EISDIR: return "EISDIR"; case EINVAL: return "EINVAL";
    case ENFILE: return "ENFILE"; case EMFILE: return "EMFILE"; case ENOTTY: return "ENOTTY";
    case EFBIG: return "EFBIG"; case ENOSPC: return "ENOSPC"; case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS"; case ENOSYS: return "ENOSYS"; case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOTBLK: return "ENOTBLK"; case ETXTBSY: return "ETXTBSY"; case EINTR: return "EINTR";
    case EDQUOT: return "EDQUOT"; case ENAMETOOLONG: return "ENAMETOOLONG"; case ELOOP: return "ELOOP";
    case EOVERFLOW: return "EOVERFLOW"; case ECANCELED: return "ECANCELED";
    default: return "UNKNOWN";
  }
}
}  // namespace livesnap
