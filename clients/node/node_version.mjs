// The one check every entry script runs first (its imports come after it, dynamically).
export const MIN_NODE_MAJOR = 20;

export function requireNode(prog) {
  const major = Number(process.versions.node.split(".")[0]);
  if (!(major >= MIN_NODE_MAJOR)) {
    process.stderr.write(`${prog}: error: Node.js >= ${MIN_NODE_MAJOR} is needed; this is ${process.version}\n`);
    process.exit(2);
  }
}
