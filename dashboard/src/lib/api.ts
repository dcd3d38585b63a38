// The node's HTTP API (docs/api.md). Errors carry OpenAI's shape: {"error": {"message", "code"}}.

import type { ModelCard, ModelInfo } from './types';

export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string | null,
  ) {
    super(message);
  }
}

async function call<T>(path: string, init?: RequestInit): Promise<T> {
  let response: Response;
  try {
    response = await fetch(path, { cache: 'no-store', ...init });
  } catch (err) {
    throw new ApiError(`cannot reach the node: ${String(err)}`, 0, null);
  }
  const text = await response.text();
  let body: unknown = null;
  try {
    body = text === '' ? null : JSON.parse(text);
  } catch {
    /* not JSON */
  }
  if (!response.ok) {
    const error = (body as { error?: { message?: string; code?: string } } | null)?.error;
    throw new ApiError(error?.message ?? `HTTP ${response.status}`, response.status, error?.code ?? null);
  }
  return body as T;
}

export async function listModels(): Promise<ModelInfo[]> {
  return (await call<{ data: ModelInfo[] }>('/v1/models')).data;
}

export interface Placed {
  instance_id: string;
  model: string;
  last_index: number;
}

export function placeInstance(model: string, nodeId: string | null): Promise<Placed> {
  const body: Record<string, string> = { model };
  if (nodeId) body.node_id = nodeId;
  return call<Placed>('/instances', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
}

/** Add a model from the Hugging Face hub by repository id; the reply is its card. */
export function addModel(repo: string): Promise<ModelCard> {
  return call<ModelCard>('/models', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ repo }),
  });
}

export function deleteInstance(instanceId: string): Promise<unknown> {
  return call(`/instances/${encodeURIComponent(instanceId)}`, { method: 'DELETE' });
}

/**
 * The placement preview (best placement per objective and the memory-proportional
 * baseline), or null when this daemon has no preview endpoint (404/405).
 */
export async function previewPlacement(model: string): Promise<unknown | null> {
  try {
    return await call<unknown>(`/placement/preview?model=${encodeURIComponent(model)}`);
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 405) && err.code !== 'model_not_found')
      return null;
    throw err;
  }
}

/** This node's own view of its cluster (GET /cluster); only what the dashboard reads. */
export interface ClusterView {
  /** Nodes refused in the last minute as unable to join (another build, secret, ...): address -> why. */
  refused: Record<string, string>;
}

export function clusterView(): Promise<ClusterView> {
  return call<ClusterView>('/cluster');
}
