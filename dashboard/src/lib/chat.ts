// Streaming chat completions against the node's OpenAI-compatible API.

import { SseParser } from './sse';
import type { ChatMessage } from './types';

export interface ChatRequest {
  model: string;
  messages: ChatMessage[];
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
}

export interface ChatProgress {
  text: string;
  /** Chunks with content received so far (one per token, as the API streams). */
  tokens: number;
  /** Client-side: from sending the request to the first content. */
  ttft_ms: number | null;
  /** Client-side tokens/s since the first token (live). */
  tokens_per_s: number | null;
  /** Latest `: loading N%` / `: queued` comment from the server. */
  note: string | null;
  finish_reason: string | null;
  usage: { prompt_tokens: number; completion_tokens: number } | null;
  /** The server's own figures (exo's `timings` extension) once the stream ends. */
  server: { time_to_first_token_ms: number; decode_tokens_per_s: number } | null;
}

export class ChatError extends Error {
  constructor(
    message: string,
    readonly code: string | null = null,
  ) {
    super(message);
  }
}

interface Chunk {
  choices?: { delta?: { content?: string | null }; finish_reason?: string | null }[];
  usage?: ChatProgress['usage'];
  timings?: ChatProgress['server'];
  error?: { message?: string; code?: string };
}

export async function streamChat(
  request: ChatRequest,
  onProgress: (p: ChatProgress) => void,
  signal?: AbortSignal,
  base = '',
  now: () => number = () => performance.now(),
): Promise<ChatProgress> {
  const started = now();
  let firstAt: number | null = null;
  const p: ChatProgress = {
    text: '',
    tokens: 0,
    ttft_ms: null,
    tokens_per_s: null,
    note: null,
    finish_reason: null,
    usage: null,
    server: null,
  };
  const response = await fetch(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok || response.body === null) {
    let message = `HTTP ${response.status}`;
    let code: string | null = null;
    try {
      const body = (await response.json()) as Chunk;
      message = body.error?.message ?? message;
      code = body.error?.code ?? null;
    } catch {
      /* not JSON */
    }
    throw new ChatError(message, code);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  let done = false;
  while (!done) {
    const { value, done: ended } = await reader.read();
    if (ended) break;
    for (const item of parser.feed(value)) {
      if (item.type === 'comment') {
        if (item.text !== '' && item.text !== 'keep-alive') p.note = item.text;
        onProgress({ ...p });
        continue;
      }
      if (item.data === '[DONE]') {
        done = true;
        break;
      }
      const chunk = JSON.parse(item.data) as Chunk;
      if (chunk.error) throw new ChatError(chunk.error.message ?? 'generation failed', chunk.error.code ?? null);
      for (const choice of chunk.choices ?? []) {
        const content = choice.delta?.content;
        if (content) {
          const t = now();
          if (firstAt === null) {
            firstAt = t;
            p.ttft_ms = t - started;
          }
          p.text += content;
          p.tokens += 1;
          p.note = null;
          const elapsed = (t - firstAt) / 1000;
          p.tokens_per_s = p.tokens > 1 && elapsed > 0 ? (p.tokens - 1) / elapsed : null;
        }
        if (choice.finish_reason) p.finish_reason = choice.finish_reason;
      }
      if (chunk.usage) p.usage = chunk.usage;
      if (chunk.timings) p.server = chunk.timings;
      onProgress({ ...p });
    }
  }
  if (!done) throw new ChatError('the stream ended without [DONE]', 'stream_closed');
  return p;
}
