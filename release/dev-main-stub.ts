// Placeholder for src/cli/main.ts, used by release/build.sh only while that file does not exist,
// so the release machinery can be built and tested against the contract `main(argv): Promise<number>`.
import { native } from '../src/device/native';

export async function main(argv: string[]): Promise<number> {
  if (argv[0] === 'version' && argv.includes('--json')) {
    process.stdout.write(JSON.stringify({ version: 'stub', node: process.version, ioEngine: native().ioEngine() }) + '\n');
    return 0;
  }
  process.stdout.write(`livesnap (release stub) argv=${JSON.stringify(argv)}\n`);
  return 0;
}
