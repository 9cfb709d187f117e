// Socket options the NBD server asks of the kernel, through the addon (only src/device calls it).
import { native } from './native';

/** SO_SNDBUF on a socket's file descriptor; returns the size the kernel granted (capped by wmem_max). */
export function setSendBuffer(fd: number, bytes: number): number {
  return native().setSendBuffer(fd, bytes);
}
