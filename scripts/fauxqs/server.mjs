// Starts the fauxqs SQS/SNS emulator on 127.0.0.1 only (fauxqs's own CLI
// listens on every interface) and prints the port it listens on.
// Usage: node server.mjs <path of fauxqs's dist/app.js> <port, 0 for a free one>
import { pathToFileURL } from "node:url";

const [appPath, portArg] = process.argv.slice(2);
const { buildApp } = await import(pathToFileURL(appPath).href);
const app = buildApp({ logger: false, host: "127.0.0.1" });
const address = await app.listen({ port: Number(portArg ?? 0), host: "127.0.0.1" });
console.log(new URL(address).port);
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => app.close().then(() => process.exit(0)));
}
