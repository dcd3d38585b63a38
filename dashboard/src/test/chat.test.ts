import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ChatError, type ChatProgress, streamChat } from '../lib/chat';
import { SseParser } from '../lib/sse';

const recorded = readFileSync(fileURLToPath(new URL('./fixtures/chat-stream.txt', import.meta.url)), 'utf8');

function streamed(body: string, pieces = 7): Response {
  const encoder = new TextEncoder();
  const size = Math.ceil(body.length / pieces);
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      for (let i = 0; i < body.length; i += size) controller.enqueue(encoder.encode(body.slice(i, i + size)));
      controller.close();
    },
  });
  return new Response(stream, { status: 200, headers: { 'content-type': 'text/event-stream' } });
}

afterEach(() => vi.unstubAllGlobals());

describe('SseParser', () => {
  it('splits events across arbitrary chunk boundaries, with comments and CRLF', () => {
    const parser = new SseParser();
    const text = ': loading 10%\r\n\r\nid: 4\r\ndata: {"a":\r\ndata: 1}\r\n\r\ndata: [DONE]\n\n';
    const items = [...text].flatMap((ch) => parser.feed(ch));
    expect(items).toEqual([
      { type: 'comment', text: 'loading 10%' },
      { type: 'data', data: '{"a":\n1}', id: '4' },
      { type: 'data', data: '[DONE]', id: null },
    ]);
  });
});

describe('streamChat', () => {
  it('streams a recorded completion and reports usage, timings and client figures', async () => {
    vi.stubGlobal('fetch', vi.fn(() => Promise.resolve(streamed(recorded))));
    let clock = 0;
    const seen: ChatProgress[] = [];
    const result = await streamChat(
      { model: 'smollm2-135m-instruct', messages: [{ role: 'user', content: 'Say hi' }] },
      (p) => seen.push(p),
      undefined,
      '',
      () => (clock += 100),
    );
    expect(result.text.length).toBeGreaterThan(0);
    expect(result.finish_reason).toBe('length');
    expect(result.usage?.completion_tokens).toBe(6);
    expect(result.server?.decode_tokens_per_s).toBeGreaterThan(0);
    expect(result.ttft_ms).toBe(100);
    expect(result.tokens_per_s).toBeCloseTo(10, 6); // one token per 100 ms of the fake clock
    expect(seen.some((p) => p.note === 'generating')).toBe(true);
    const body = JSON.parse((vi.mocked(fetch).mock.calls[0]?.[1]?.body as string) ?? '{}') as Record<string, unknown>;
    expect(body.stream).toBe(true);
    expect(body.stream_options).toEqual({ include_usage: true });
  });

  it('raises the API error message of a refused request', async () => {
    const error = { error: { message: 'The model x does not exist', code: 'model_not_found' } };
    vi.stubGlobal('fetch', vi.fn(() => Promise.resolve(new Response(JSON.stringify(error), { status: 404 }))));
    await expect(streamChat({ model: 'x', messages: [] }, () => {})).rejects.toThrow('The model x does not exist');
  });

  it('raises an error sent inside the stream and a stream cut before [DONE]', async () => {
    const failed = 'data: {"error": {"message": "runner died", "code": "generation_failed"}}\n\n';
    vi.stubGlobal('fetch', vi.fn(() => Promise.resolve(streamed(failed))));
    await expect(streamChat({ model: 'm', messages: [] }, () => {})).rejects.toThrow(ChatError);
    const cut = recorded.slice(0, recorded.indexOf('[DONE]') - 6);
    vi.stubGlobal('fetch', vi.fn(() => Promise.resolve(streamed(cut))));
    await expect(streamChat({ model: 'm', messages: [] }, () => {})).rejects.toThrow('without [DONE]');
  });
});
