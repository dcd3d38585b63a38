/// <reference types="vitest/config" />
import { svelte } from '@sveltejs/vite-plugin-svelte';
import { defineConfig } from 'vite';

// `npm run dev` proxies the API to a local node (EXO_API, default http://127.0.0.1:52415).
const api = process.env.EXO_API ?? 'http://127.0.0.1:52415';
const proxied = ['/state', '/events', '/instances', '/v1', '/healthz', '/placement'];

export default defineConfig({
  plugins: [svelte()],
  // Relative asset URLs: the daemon serves dist/ at its root.
  base: './',
  build: { outDir: 'dist', emptyOutDir: true, chunkSizeWarningLimit: 400 },
  server: { proxy: Object.fromEntries(proxied.map((p) => [p, { target: api, changeOrigin: true }])) },
  test: { include: ['src/**/*.test.ts'], environment: 'node' },
});
