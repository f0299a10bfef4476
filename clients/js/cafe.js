/*
 * cafe.js: a browser client for cafe-gateway, with no dependencies and no build step.
 *
 * Load it as a classic script (<script src="cafe.js"></script>) or import it as a module
 * for its effect (import "./cafe.js"); either way it defines globalThis.CafeClient.
 *
 *   const cafe = new CafeClient({
 *     endpoint: "https://cafe.example.com", // the gateway; records go to POST /v1/<type>
 *     apiKey: "cafe_...",    // sent as x-api-key; the key must list this page's origin
 *     beaconKey: "cafe_...", // optional: a key created with --browser, for navigator.sendBeacon
 *     batchSize: 20,         // records per request (the gateway takes at most 500)
 *     flushMs: 2000,         // how long a record may wait for its batch to fill
 *     gzip: true,            // compress bodies when the browser has CompressionStream
 *     maxRetries: 3,         // tries again after 503 or 429, waiting as Retry-After says
 *     onError: (error, type, records) => console.warn(error), // a batch that did not go
 *     trace: () => ({traceparent, tracestate}), // optional: the trace a request belongs to
 *   });
 *   cafe.track("activity", {messageFormatVersion: 1, messageType: "ClientEventingActivity", ...});
 *   await cafe.flush(); // send what is queued now; rejects with the first failure
 *
 * Record types are "activity", "log" and "profile". Requests use fetch with keepalive, so
 * one still goes after its page is left; browsers allow such a body only under 64 KiB,
 * counting all of a page's keepalive requests at once, so batches are split to fit and
 * sent one at a time. When the page is hidden or left, what is still queued goes by
 * sendBeacon to ?api_key=<beaconKey> as text/plain (a beacon can set no header), or by a
 * keepalive fetch if there is no beaconKey. A batch waiting to be retried when the page
 * is left is lost; the gateway answers with a 2xx only once Kafka holds the records.
 *
 * Each fetch carries the page's W3C trace context, if it has one, as the traceparent and
 * tracestate headers, and the gateway writes them beside every record, so the trace goes
 * on to the consumers. By default the page's own is read from <meta name="traceparent">
 * and <meta name="tracestate">, as a server that traced the page writes them; `trace`
 * gives it instead (a tracing library's current span, say). A beacon can set no header,
 * so the records it sends start a new trace at the gateway.
 */
(() => {
  "use strict";

  const TYPES = ["activity", "log", "profile"];
  const MAX_BODY = 65536 - 1024; // under the keepalive and beacon limit of 64 KiB
  const MAX_RECORDS = 500; // the gateway's limit per request
  const ENVELOPE = '{"records":[]}'.length;
  const encoder = new TextEncoder();

  const envelope = (records) => `{"records":[${records.join(",")}]}`;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function gzip(text) {
    const stream = new Blob([text]).stream().pipeThrough(new CompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // Milliseconds to wait before try number `attempt` + 1: Retry-After (seconds or a
  // date) when the gateway sent one, else 1 s, 2 s, 4 s...; never more than 30 s.
  function retryDelay(response, attempt) {
    const header = response.headers.get("retry-after");
    let ms = header === null ? NaN : Number(header) * 1000;
    if (Number.isNaN(ms) && header !== null) ms = Date.parse(header) - Date.now();
    if (Number.isNaN(ms)) ms = 1000 * 2 ** attempt;
    return Math.min(Math.max(ms, 0), 30000);
  }

  // The trace context a server that traced the page wrote into it, if any.
  function pageTrace() {
    const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || null;
    return { traceparent: meta("traceparent"), tracestate: meta("tracestate") };
  }

  class CafeClient {
    constructor({
      endpoint,
      apiKey,
      beaconKey = null,
      batchSize = 20,
      flushMs = 2000,
      gzip = true,
      maxRetries = 3,
      onError = (error) => console.warn("cafe:", error),
      trace = pageTrace,
    }) {
      this.endpoint = endpoint.replace(/\/+$/, "");
      this.apiKey = apiKey;
      this.beaconKey = beaconKey;
      this.batchSize = Math.min(Math.max(1, batchSize), MAX_RECORDS);
      this.flushMs = flushMs;
      this.gzip = gzip && typeof CompressionStream === "function";
      this.maxRetries = maxRetries;
      this.onError = onError;
      this.trace = trace;
      this.queues = { activity: [], log: [], profile: [] }; // of {json, size}
      this.timer = null;
      this.draining = null;
      addEventListener("pagehide", () => this.leave());
      addEventListener("visibilitychange", () => {
        if (document.visibilityState === "hidden") this.leave();
      });
    }

    track(type, record) {
      const queue = this.queues[type];
      if (!Array.isArray(queue)) throw new TypeError(`cafe: no record type ${type}`);
      const json = JSON.stringify(record);
      queue.push({ json, size: encoder.encode(json).length });
      // A background flush reports its failures through onError.
      if (queue.length >= this.batchSize) this.flush().catch(() => {});
      else if (this.timer === null) {
        this.timer = setTimeout(() => this.flush().catch(() => {}), this.flushMs);
      }
    }

    flush() {
      clearTimeout(this.timer);
      this.timer = null;
      // One drain at a time: it keeps going until every queue is empty.
      this.draining ??= this.drain().finally(() => (this.draining = null));
      return this.draining.then((errors) => {
        if (errors.length) throw errors[0];
      });
    }

    async drain() {
      const errors = [];
      for (let type; (type = TYPES.find((t) => this.queues[t].length)); ) {
        const records = this.take(type, this.batchSize);
        try {
          await this.post(type, records);
        } catch (error) {
          errors.push(error);
          this.onError(error, type, records.map((r) => JSON.parse(r)));
        }
      }
      return errors;
    }

    // Up to `max` queued records of `type` whose envelope fits in MAX_BODY (at least one).
    take(type, max) {
      const queue = this.queues[type];
      let n = 0;
      for (let size = ENVELOPE; n < queue.length && n < max; n++) {
        size += queue[n].size + 1;
        if (n > 0 && size > MAX_BODY) break;
      }
      return queue.splice(0, n).map((r) => r.json);
    }

    async post(type, records) {
      const headers = { "content-type": "application/json", "x-api-key": this.apiKey };
      const { traceparent, tracestate } = this.trace() ?? {};
      if (traceparent) {
        headers.traceparent = traceparent;
        if (tracestate) headers.tracestate = tracestate;
      }
      let body = envelope(records);
      if (this.gzip) {
        body = await gzip(body);
        headers["content-encoding"] = "gzip";
      }
      const size = typeof body === "string" ? encoder.encode(body).length : body.byteLength;
      const init = { method: "POST", keepalive: size <= MAX_BODY, headers, body };
      for (let attempt = 0; ; attempt++) {
        const response = await fetch(`${this.endpoint}/v1/${type}`, init);
        const retry = response.status === 503 || response.status === 429;
        if (retry && attempt < this.maxRetries) {
          await sleep(retryDelay(response, attempt));
        } else if (!response.ok) {
          const error = new Error(`cafe: POST /v1/${type} answered ${response.status}`);
          error.status = response.status;
          error.problem = await response.text();
          throw error;
        } else {
          return response.json();
        }
      }
    }

    // The page is being hidden or left: send what is queued while it still can be.
    leave() {
      if (!this.beaconKey || typeof navigator.sendBeacon !== "function") {
        this.flush().catch(() => {});
        return;
      }
      clearTimeout(this.timer);
      this.timer = null;
      const key = encodeURIComponent(this.beaconKey);
      for (const type of TYPES) {
        while (this.queues[type].length) {
          const queued = this.queues[type].slice(0, MAX_RECORDS);
          const records = this.take(type, MAX_RECORDS);
          const blob = new Blob([envelope(records)], { type: "text/plain" });
          if (!navigator.sendBeacon(`${this.endpoint}/v1/${type}?api_key=${key}`, blob)) {
            // Over the browser's beacon budget: keep them for the next flush, if any.
            this.queues[type].unshift(...queued.slice(0, records.length));
            this.timer ??= setTimeout(() => this.flush().catch(() => {}), this.flushMs);
            return;
          }
        }
      }
    }
  }

  globalThis.CafeClient = CafeClient;
})();
