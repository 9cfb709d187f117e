// A lint rule as a test: JavaScript's bitwise operators work on 32 bits, so `i >>> 3` or `x & ~7`
// silently wraps a block number or byte offset at 2^32 (16 TiB at 4 KiB blocks). Every bitwise
// operation in src/ whose operands look like an index, an offset or a size must say on its line why
// it is safe (`// 32-bit-ok: reason`), or be rewritten with Math.floor, % and multiplication.
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as ts from 'typescript';

const SRC = path.resolve(__dirname, '../../src');
const BITWISE = new Set([
  ts.SyntaxKind.AmpersandToken, ts.SyntaxKind.BarToken, ts.SyntaxKind.CaretToken,
  ts.SyntaxKind.LessThanLessThanToken, ts.SyntaxKind.GreaterThanGreaterThanToken, ts.SyntaxKind.GreaterThanGreaterThanGreaterThanToken,
  ts.SyntaxKind.AmpersandEqualsToken, ts.SyntaxKind.BarEqualsToken, ts.SyntaxKind.CaretEqualsToken,
  ts.SyntaxKind.LessThanLessThanEqualsToken, ts.SyntaxKind.GreaterThanGreaterThanEqualsToken, ts.SyntaxKind.GreaterThanGreaterThanGreaterThanEqualsToken,
]);

/** Names that hold (or may hold) a block number, byte offset, size or count. */
const INDEXISH = /^(i|j|k|n|b|e|s|o|q|p|t|at|off|pos|end|start|first|last|from|to|len|size|total|count|limit|whole|rem)$|block|blk|bno|offset|sector|lba|length|index|idx|phys|logical|bytes|size|count|total|end|start|first|last|cursor|pos/i;

const CONSTANT = /^[A-Z][A-Z0-9_]*$/;

function names(node: ts.Node, out: string[] = []): string[] {
  // ALL_CAPS names are flag and mask constants.
  if (ts.isIdentifier(node)) { if (!CONSTANT.test(node.text)) out.push(node.text); }
  else if (ts.isPropertyAccessExpression(node)) { if (!CONSTANT.test(node.name.text)) out.push(node.name.text); }
  else if (ts.isElementAccessExpression(node)) names(node.expression, out);
  else if (ts.isCallExpression(node)) return out; // a call's result is judged by its own code
  else node.forEachChild((c) => { names(c, out); });
  return out;
}

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...sourceFiles(p));
    else if (e.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

export function findSuspects(file: string, text: string): string[] {
  const sf = ts.createSourceFile(file, text, ts.ScriptTarget.ES2022, true);
  const lines = text.split('\n');
  const found: string[] = [];
  const visit = (node: ts.Node) => {
    let operands: ts.Node[] | undefined;
    if (ts.isBinaryExpression(node) && BITWISE.has(node.operatorToken.kind)) operands = [node.left, node.right];
    else if (ts.isPrefixUnaryExpression(node) && node.operator === ts.SyntaxKind.TildeToken) operands = [node.operand];
    if (operands) {
      const line = sf.getLineAndCharacterOfPosition(node.getStart(sf)).line;
      const suspicious = operands.flatMap((o) => names(o)).filter((n) => INDEXISH.test(n));
      if (suspicious.length && !/32-bit-ok/.test(lines[line] ?? '')) {
        found.push(`${path.relative(SRC, file)}:${line + 1}: ${node.getText(sf).slice(0, 80)}  (operand ${suspicious.join(', ')})`);
      }
    }
    node.forEachChild(visit);
  };
  visit(sf);
  return found;
}

test('no 32-bit bitwise arithmetic on block numbers, offsets or sizes in src/', (t) => {
  const found = sourceFiles(SRC).flatMap((f) => findSuspects(f, fs.readFileSync(f, 'utf8')));
  t.deepEqual(found, [], `bitwise operators on index-like values (rewrite with Math.floor / %, or mark "// 32-bit-ok: why"):\n${found.join('\n')}`);
});

test('the rule catches the bug that lost data past 16 TiB', (t) => {
  const bad = 'export function get(bytes: Uint8Array, i: number) { return (bytes[i >>> 3]! & (1 << (i & 7))) !== 0; }\n';
  // i >>> 3, i & 7, 1 << (i & 7), and the & of the byte with that mask (it has i inside).
  t.is(findSuspects('bad.ts', bad).length, 4);
  t.is(findSuspects('bad2.ts', 'const fullEnd = end & ~7;\n').length, 1);
  const fine = 'const m = flags & 0x80;\nconst ok = (bytes[i >>> 3]! & 1) !== 0; // 32-bit-ok: i is a leaf offset\n';
  t.deepEqual(findSuspects('fine.ts', fine), []);
});
