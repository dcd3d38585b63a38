// An incremental Server-Sent Events parser for fetch() bodies (EventSource cannot POST).

export type SseItem = { type: 'data'; data: string; id: string | null } | { type: 'comment'; text: string };

export class SseParser {
  private buffer = '';

  /** Feed decoded text; returns the items completed by it. */
  feed(chunk: string): SseItem[] {
    this.buffer += chunk;
    const items: SseItem[] = [];
    for (;;) {
      const match = /\r\n\r\n|\n\n|\r\r/.exec(this.buffer);
      if (match === null) break;
      const block = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const data: string[] = [];
      let id: string | null = null;
      for (const line of block.split(/\r\n|\n|\r/)) {
        if (line.startsWith(':')) {
          items.push({ type: 'comment', text: line.slice(1).trim() });
          continue;
        }
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'data') data.push(value);
        else if (field === 'id') id = value;
      }
      if (data.length > 0) items.push({ type: 'data', data: data.join('\n'), id });
    }
    return items;
  }
}
