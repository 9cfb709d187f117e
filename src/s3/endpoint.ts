// An S3 endpoint URL, checked the same way wherever it comes from (an option or the environment).
import { UserError } from '../util/errors';

export function checkEndpoint(url: string, from: string): string {
  let u: URL | undefined;
  try { u = new URL(url); } catch { u = undefined; }
  if (!u || (u.protocol !== 'https:' && u.protocol !== 'http:')) throw new UserError(`${from} "${url}" is not an http(s) URL`, 'give it as http(s)://HOST[:PORT], e.g. https://s3.example.com');
  return url;
}
