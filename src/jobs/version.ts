// The tool's version from package.json (tsc copies it into dist/, esbuild inlines it in the binary).
import { version } from '../../package.json';

export const TOOL_VERSION: string = version;
