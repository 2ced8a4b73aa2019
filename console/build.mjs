// Bundles the console into one directory: app.js (the TypeScript app with Preact and the AWS
// SDK for JavaScript v3), index.html and console.css. crates/server/build.rs runs this with
// its OUT_DIR and embeds the result in the binary; `npm run build` writes dist/ to look at.
import { copyFile, mkdir } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, "dist"));
await mkdir(out, { recursive: true });
await esbuild.build({
  absWorkingDir: here,
  entryPoints: ["src/main.tsx"],
  bundle: true,
  minify: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  jsx: "automatic",
  jsxImportSource: "preact",
  outfile: join(out, "app.js"),
  // The licences of what is bundled, in one file beside it rather than in the bundle.
  legalComments: "external",
  logLevel: "warning",
});
for (const f of ["index.html", "console.css"]) {
  await copyFile(join(here, "static", f), join(out, f));
}
