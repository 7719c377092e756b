// The crank-registry dashboard: reads the controller's JSON API and follows its change feed.
//
// What it loads, and how it stays live without reloading the page:
// * GET health: the status strip, and the epoch and revision the feed starts from
//   (asked again every few seconds, and soon after changes, for the counts);
// * GET capabilities (every page): the capability table; each entry lists its
//   workers and healthy workers, so feed events are applied to it exactly. The
//   table shows a page of it at a time, narrowed by its search box, and the
//   worker table's capability choices are the first of those found: thousands of
//   capabilities make neither a huge table nor a huge list;
// * GET workers: ONE page of the worker table (the listing's cursors, its
//   filters by capability and state), never the whole fleet; feed events are
//   applied to the rows shown, and the page is read again (debounced) when an
//   event may change which workers it holds, and every few seconds for the
//   heartbeat ages and loads (heartbeats are not feed events);
// * the feed, from the revision held: GET watch as Server-Sent Events
//   (EventSourceFeed) when the controller's OpenAPI document says it serves
//   them, else, or when a stream cannot start, the long poll (LongPollFeed).
//   A 410 (the position left the window, or another history) reloads the data.
//   "?feed=poll" in the page's URL chooses the long poll (for a proxy that holds
//   streams back).
// Both feeds have start/stop and the same callbacks: onChanges(events) in
// revision order, onLost(error) on a 410, onGap() when changes went by that the
// page could not read, onState(status, detail).
"use strict";

(() => {
  const HEALTH_EVERY_MS = 5000;
  const WORKERS_EVERY_MS = 15000;
  const PAGE_REFRESH_DELAY_MS = 1000;
  const LONG_POLL_S = 25;
  const CHANGES_KEPT = 50;
  const CAPABILITY_PAGE = 500;
  const CAPABILITY_ROWS = 20; // rows of the capability table a page
  const CAPABILITY_CHOICES = 100; // capabilities the worker filter offers at once
  const RETRY_MAX_MS = 15000;
  const STREAM_BATCH_MS = 50;
  // The changes of the feed (DESIGN, "Change feed"); EventSource hands over only the
  // event types listened for (a newer type shows as a gap at the next bookmark).
  const CHANGE_TYPES = [
    "registered",
    "deregistered",
    "unhealthy",
    "healthy",
    "evicted",
    "imported",
    "draining",
    "undrained",
    "ejected",
    "restored",
  ];
  const SEP = "\u0000";

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, body) {
      super(body && body.message ? `${body.error}: ${body.message}` : `HTTP ${status}`);
      this.status = status;
      this.code = body ? body.error : undefined;
    }
  }

  function query(params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value !== null && value !== undefined && value !== "") search.set(name, String(value));
    }
    const text = search.toString();
    return text ? `?${text}` : "";
  }

  // Paths are relative to the page (/ui): "health" is /health, or /prefix/health when mounted.
  async function getJson(path, signal) {
    const response = await fetch(path, {
      headers: { Accept: "application/json" },
      cache: "no-store",
      signal,
    });
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ----------------------------------------------------------------- the feed

  // Follows GET watch from `since`: onChanges(events) for each non-empty batch, in
  // revision order; onLost(error) once, on a 410 (the caller reloads and starts
  // another feed); onState(text) says how it is doing.
  class LongPollFeed {
    constructor({ epoch, since, onChanges, onLost, onState }) {
      Object.assign(this, { epoch, since, onChanges, onLost, onState });
      this.running = false;
      this.aborter = null;
    }

    start() {
      this.running = true;
      // A long poll answers only at a change or its timeout: live from the first ask.
      this.onState("live", "long poll");
      this.loop();
    }

    stop() {
      this.running = false;
      if (this.aborter) this.aborter.abort();
    }

    async loop() {
      let failures = 0;
      while (this.running) {
        this.aborter = new AbortController();
        try {
          const answer = await getJson(
            `watch${query({ epoch: this.epoch, since: this.since, timeout: LONG_POLL_S })}`,
            this.aborter.signal,
          );
          if (!this.running) return;
          if (failures) this.onState("live", "long poll");
          failures = 0;
          const events = answer.events;
          // At most 1000 events an answer: continue from the last one, else from the bookmark.
          this.since = events.length ? events[events.length - 1].revision : answer.revision;
          if (events.length) this.onChanges(events);
        } catch (error) {
          if (!this.running) return;
          if (error instanceof ApiError && error.status === 410) {
            this.running = false;
            this.onLost(error);
            return;
          }
          failures += 1;
          this.onState("retrying", error.message);
          await sleep(Math.min(500 * 2 ** failures, RETRY_MAX_MS));
        }
      }
    }
  }

  // Follows GET watch as Server-Sent Events (EventSource sends Accept:
  // text/event-stream, and Last-Event-ID when it reconnects by itself). Changes
  // that arrive together are handed over in one batch. A stream that cannot start
  // (an older controller, a 410 or a proxy's error before it) hands over to the
  // long poll from the last revision delivered; an error event (the reader fell
  // behind the window) is a 410.
  class EventSourceFeed {
    constructor(options) {
      this.options = options;
      Object.assign(this, options);
      this.source = null;
      this.fallback = null;
      this.pending = [];
      this.flushTimer = null;
      this.running = false;
    }

    start() {
      this.running = true;
      const source = new EventSource(`watch${query({ epoch: this.epoch, since: this.since })}`);
      this.source = source;
      source.addEventListener("open", () => this.onState("live", "events"));
      for (const type of CHANGE_TYPES) {
        source.addEventListener(type, (message) => this.receive(JSON.parse(message.data)));
      }
      source.addEventListener("bookmark", (message) => this.bookmark(JSON.parse(message.data)));
      source.addEventListener("error", (event) => this.failed(event));
    }

    stop() {
      this.running = false;
      this.close();
      if (this.fallback) this.fallback.stop();
    }

    close() {
      if (this.source) this.source.close();
      this.source = null;
      clearTimeout(this.flushTimer);
      this.flush();
    }

    receive(event) {
      if (event.revision <= this.since) return; // resent after a reconnection
      this.since = event.revision;
      this.pending.push(event);
      if (!this.flushTimer) this.flushTimer = setTimeout(() => this.flush(), STREAM_BATCH_MS);
    }

    flush() {
      this.flushTimer = null;
      const events = this.pending;
      this.pending = [];
      if (events.length && this.running) this.onChanges(events);
    }

    bookmark(mark) {
      if (mark.revision > this.since) {
        // Changes of a type this page does not listen for went by.
        this.since = mark.revision;
        this.flush();
        this.onGap(mark.revision);
      }
    }

    failed(event) {
      if (!this.running) return;
      if (event.data !== undefined) {
        // The controller's own "error" event: the 410 body of a reader left behind.
        this.running = false;
        this.close();
        const body = JSON.parse(event.data);
        this.onLost(new ApiError(410, body));
        return;
      }
      if (this.source && this.source.readyState === EventSource.CONNECTING) {
        this.onState("retrying", "the event stream was cut; reconnecting");
        return;
      }
      // Closed by the browser: the stream could not start. The long poll says why.
      this.close();
      this.fallback = new LongPollFeed({ ...this.options, since: this.since });
      this.fallback.start();
    }
  }

  // Whether the controller serves /watch as Server-Sent Events (its OpenAPI document
  // lists text/event-stream for it); "?feed=poll" chooses the long poll.
  async function streamsChanges() {
    if (new URLSearchParams(window.location.search).get("feed") === "poll") return false;
    if (typeof EventSource !== "function") return false;
    try {
      const api = await getJson("openapi.json");
      return "text/event-stream" in api.paths["/watch"].get.responses["200"].content;
    } catch (error) {
      return false;
    }
  }

  // ------------------------------------------------------------------- state

  const state = {
    streams: null, // whether the feed is read as Server-Sent Events (asked once)
    epoch: null,
    revision: null,
    feed: null,
    health: null,
    healthAt: 0, // performance.now() when health was read
    clockOffsetMs: 0, // the controller's clock minus this browser's
    // "verb\0capability" -> {verb, capability, label, folded (the label in lower case),
    //   versions: Map(version -> {workers, healthy})}
    capabilities: new Map(),
    capabilityOrder: null, // the entries of capabilities, sorted (null: to sort again)
    capabilitySearch: "", // the capability table's search text
    capabilityPage: 0, // the page of the capability table shown
    // worker id -> Set of "verb\0capability\0version" it is listed under
    offers: new Map(),
    filter: { capability: "", state: "" },
    pageSize: 50,
    cursors: [null], // cursors[i]: the cursor of page i (null: the first)
    pageIndex: 0,
    nextCursor: null,
    rows: [], // the worker entries shown, in the listing's order
    workersAsked: 0, // reads of the worker page asked for (the last one's answer is shown)
    departed: new Map(), // worker id -> revision it left at, while a page read may predate it
    draining: new Set(), // worker ids known to drain (from the rows read and the feed)
    matching: null,
    total: null,
    changes: [],
    pageRefresh: null,
    healthRefresh: null,
    loading: null,
  };

  const $ = (id) => document.getElementById(id);

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function showProblem(text) {
    const banner = $("problem");
    banner.textContent = text || "";
    banner.hidden = !text;
  }

  // ------------------------------------------------------------ formatting

  const numbers = new Intl.NumberFormat("en");

  function duration(seconds) {
    if (!Number.isFinite(seconds)) return "–";
    seconds = Math.max(0, Math.floor(seconds));
    const days = Math.floor(seconds / 86400);
    const hours = Math.floor((seconds % 86400) / 3600);
    const minutes = Math.floor((seconds % 3600) / 60);
    const rest = seconds % 60;
    if (days) return `${days}d ${hours}h ${minutes}m`;
    if (hours) return `${hours}h ${minutes}m ${rest}s`;
    if (minutes) return `${minutes}m ${rest}s`;
    return `${rest}s`;
  }

  function clockTime(seconds) {
    return new Date(seconds * 1000).toISOString().slice(11, 19);
  }

  function controllerNowMs() {
    return Date.now() + state.clockOffsetMs;
  }

  function loadText(load) {
    if (!load) return "–";
    const parts = [];
    if (load.in_flight !== undefined) parts.push(`${load.in_flight} in flight`);
    if (load.latency_p95_ms !== undefined) parts.push(`p95 ${Math.round(load.latency_p95_ms)} ms`);
    if (load.error_rate !== undefined) parts.push(`${(load.error_rate * 100).toFixed(1)}% errors`);
    return parts.length ? parts.join(" · ") : "–";
  }

  // --------------------------------------------------------- status strip

  function selfPreservation(health) {
    // Shown only when /health carries the field and says it is on.
    const value = health.self_preservation;
    if (value === undefined || value === null || value === false) return null;
    if (value === true) return "";
    if (typeof value === "object" && value.active) return value.reason || value.message || "";
    return null;
  }

  function renderStatus() {
    const health = state.health;
    if (!health) return;
    const elapsed = (performance.now() - state.healthAt) / 1000;
    $("uptime").textContent =
      health.uptime_s === undefined ? "–" : duration(health.uptime_s + elapsed);
    $("revision").textContent = state.revision === null ? "–" : numbers.format(state.revision);
    $("worker-counts").textContent =
      `${numbers.format(health.healthy_workers)} / ${numbers.format(health.total_workers)}`;
    const beats = $("heartbeats");
    if (health.heartbeats_last_minute === undefined) {
      beats.textContent = "–";
      $("heartbeats-expected").textContent = "";
    } else {
      const expected = health.expected_heartbeats_per_minute;
      beats.textContent = numbers.format(health.heartbeats_last_minute);
      $("heartbeats-expected").textContent =
        expected === undefined ? "" : `expected ${numbers.format(Math.round(expected))}`;
      // Below 80% of the expected rate, once a whole minute has been counted.
      const short =
        expected !== undefined &&
        health.uptime_s >= 60 &&
        health.heartbeats_last_minute < 0.8 * expected;
      beats.classList.toggle("short", short);
    }
    const banner = $("self-preservation");
    const reason = selfPreservation(health);
    banner.hidden = reason === null;
    if (reason !== null) {
      banner.textContent =
        "Self-preservation: the controller is not evicting silent workers" +
        (reason ? ` (${reason})` : "") +
        ".";
    }
  }

  async function loadHealth() {
    const health = await getJson("health");
    state.health = health;
    state.healthAt = performance.now();
    if (health.timestamp) state.clockOffsetMs = Date.parse(health.timestamp) - Date.now();
    renderStatus();
    return health;
  }

  function refreshHealthSoon() {
    if (state.healthRefresh) return;
    state.healthRefresh = setTimeout(async () => {
      state.healthRefresh = null;
      try {
        await loadHealth();
      } catch (error) {
        showProblem(`controller unreachable: ${error.message}`);
      }
    }, 500);
  }

  // ------------------------------------------------------------ capabilities

  function capabilityKey(verb, capability) {
    return `${verb}${SEP}${capability}`;
  }

  function capabilityEntry(verb, capability) {
    const label = `${verb}:${capability}`;
    return { verb, capability, label, folded: label.toLowerCase(), versions: new Map() };
  }

  function versionEntry(verb, capability, version) {
    const key = capabilityKey(verb, capability);
    let entry = state.capabilities.get(key);
    if (!entry) {
      entry = capabilityEntry(verb, capability);
      state.capabilities.set(key, entry);
      state.capabilityOrder = null;
    }
    let members = entry.versions.get(version);
    if (!members) {
      members = { workers: new Set(), healthy: new Set() };
      entry.versions.set(version, members);
    }
    return members;
  }

  function forEachOffer(workerId, action) {
    for (const offer of state.offers.get(workerId) || []) {
      const [verb, capability, version] = offer.split(SEP);
      const entry = state.capabilities.get(capabilityKey(verb, capability));
      const members = entry && entry.versions.get(version);
      if (members) action(members, entry, version);
    }
  }

  function withdraw(workerId) {
    forEachOffer(workerId, (members, entry, version) => {
      members.workers.delete(workerId);
      members.healthy.delete(workerId);
      if (!members.workers.size) entry.versions.delete(version);
      if (!entry.versions.size) {
        state.capabilities.delete(capabilityKey(entry.verb, entry.capability));
        state.capabilityOrder = null;
      }
    });
    state.offers.delete(workerId);
  }

  function offer(workerId, capabilities, healthy) {
    const offers = new Set();
    for (const c of capabilities) {
      const members = versionEntry(c.verb, c.name, c.version);
      members.workers.add(workerId);
      if (healthy) members.healthy.add(workerId);
      offers.add([c.verb, c.name, c.version].join(SEP));
    }
    state.offers.set(workerId, offers);
  }

  async function loadCapabilities() {
    const capabilities = new Map();
    const offers = new Map();
    let cursor = null;
    do {
      const page = await getJson(`capabilities${query({ limit: CAPABILITY_PAGE, cursor })}`);
      for (const item of page.capabilities) {
        const key = capabilityKey(item.verb, item.capability);
        if (!capabilities.has(key)) {
          capabilities.set(key, capabilityEntry(item.verb, item.capability));
        }
        capabilities.get(key).versions.set(item.version, {
          workers: new Set(item.workers),
          healthy: new Set(item.healthy_workers),
        });
        for (const id of item.workers) {
          if (!offers.has(id)) offers.set(id, new Set());
          offers.get(id).add([item.verb, item.capability, item.version].join(SEP));
        }
      }
      cursor = page.next_cursor || null;
    } while (cursor);
    state.capabilities = capabilities;
    state.capabilityOrder = null;
    state.offers = offers;
    renderCapabilities();
  }

  function compareVersions(a, b) {
    return a.localeCompare(b, "en", { numeric: true });
  }

  const collator = new Intl.Collator("en");

  // The capabilities, sorted by verb then capability; sorted again only when one
  // comes or goes (feed events mostly change counts).
  function sortedCapabilities() {
    if (!state.capabilityOrder) {
      state.capabilityOrder = [...state.capabilities.values()].sort(
        (a, b) => collator.compare(a.verb, b.verb) || collator.compare(a.capability, b.capability),
      );
    }
    return state.capabilityOrder;
  }

  // The capabilities whose "verb:capability" contains the search text (case aside), in order.
  function foundCapabilities() {
    const text = state.capabilitySearch.trim().toLowerCase();
    const all = sortedCapabilities();
    return text ? all.filter((entry) => entry.folded.includes(text)) : all;
  }

  // One page of the capabilities found: the workers of a row are counted only when shown.
  function renderCapabilities() {
    const found = foundCapabilities();
    const pages = Math.max(1, Math.ceil(found.length / CAPABILITY_ROWS));
    state.capabilityPage = Math.min(state.capabilityPage, pages - 1);
    const first = state.capabilityPage * CAPABILITY_ROWS;
    const shown = found.slice(first, first + CAPABILITY_ROWS);
    const fragment = document.createDocumentFragment();
    for (const entry of shown) {
      const workers = new Set();
      const healthy = new Set();
      for (const members of entry.versions.values()) {
        members.workers.forEach((id) => workers.add(id));
        members.healthy.forEach((id) => healthy.add(id));
      }
      const row = element("tr");
      row.dataset.capability = entry.label;
      row.title = "Show its workers";
      row.append(
        element("td", entry.verb),
        element("td", entry.capability),
        element("td", [...entry.versions.keys()].sort(compareVersions).join(", ")),
        element(
          "td",
          `${numbers.format(healthy.size)} / ${numbers.format(workers.size)}`,
          healthy.size === 0 ? "number none" : healthy.size < workers.size ? "number short" : "number",
        ),
      );
      row.addEventListener("click", () => chooseCapability(entry.label));
      fragment.append(row);
    }
    $("capability-rows").replaceChildren(fragment);
    const total = state.capabilities.size;
    const empty = $("capabilities-empty");
    empty.hidden = shown.length > 0;
    empty.textContent = total ? "No capability matches." : "No capability is registered.";
    $("capability-count").textContent = !total
      ? ""
      : found.length === total
        ? `(${numbers.format(total)})`
        : `(${numbers.format(found.length)} of ${numbers.format(total)})`;
    // The pager only when the capabilities found take more than one page.
    $("capability-position").closest("nav").hidden = pages === 1;
    $("capability-position").textContent =
      `${numbers.format(first + 1)}–${numbers.format(first + shown.length)} ` +
      `of ${numbers.format(found.length)}`;
    $("previous-capabilities").disabled = state.capabilityPage === 0;
    $("next-capabilities").disabled = state.capabilityPage >= pages - 1;
    renderCapabilityChoices(found);
  }

  let choicesSignature = null;
  // The worker filter's choices: the first CAPABILITY_CHOICES capabilities found
  // (the search box narrows them), and the one chosen.
  function renderCapabilityChoices(found) {
    const select = $("filter-capability");
    const chosen = state.filter.capability;
    const labels = found.slice(0, CAPABILITY_CHOICES).map((entry) => entry.label);
    const more = found.length - labels.length;
    // A filter on a capability not offered (gone from the fleet, or beyond the
    // first found) stays selectable.
    if (chosen && !labels.includes(chosen)) labels.push(chosen);
    // Rebuilt only when the choices change (a rebuild closes a list the user has open).
    const signature = `${labels.join(SEP)}${SEP}${more}`;
    if (signature !== choicesSignature) {
      choicesSignature = signature;
      const options = [element("option", "any")];
      options[0].value = "";
      for (const label of labels) {
        const option = element("option", label);
        option.value = label;
        options.push(option);
      }
      if (more > 0) {
        const note = element("option", `… ${numbers.format(more)} more: narrow them with Find`);
        note.value = "";
        note.disabled = true;
        options.push(note);
      }
      select.replaceChildren(...options);
    }
    if (select.value !== chosen) select.value = chosen;
  }

  function chooseCapability(label) {
    state.filter.capability = label;
    renderCapabilityChoices(foundCapabilities());
    firstPage();
  }

  // ------------------------------------------------------------------ workers

  function filterQuery() {
    const [verb, capability] = splitLabel(state.filter.capability);
    return { state: state.filter.state, verb, capability };
  }

  function splitLabel(label) {
    if (!label) return [null, null];
    const colon = label.indexOf(":");
    return [label.slice(0, colon), label.slice(colon + 1)];
  }

  async function loadWorkers() {
    const cursor = state.cursors[state.pageIndex];
    const asked = ++state.workersAsked;
    const revision = state.revision;
    const page = await getJson(
      `workers${query({ ...filterQuery(), limit: state.pageSize, cursor })}`,
    );
    if (asked !== state.workersAsked) return; // a later read (another page, filter) wins
    if (state.revision !== revision) {
      // Changes were applied while the page was read, which it may predate: the
      // workers that left meanwhile stay out, and the page is read again.
      page.workers = page.workers.filter((entry) => !(state.departed.get(entry.worker_id) > revision));
      refreshPageSoon();
    } else {
      state.departed.clear();
    }
    state.rows = page.workers;
    for (const entry of page.workers) {
      if (entry.draining) state.draining.add(entry.worker_id);
      else state.draining.delete(entry.worker_id);
    }
    state.nextCursor = page.next_cursor || null;
    state.total = page.total_workers;
    state.matching = page.matching_workers === undefined ? page.total_workers : page.matching_workers;
    // A page emptied by departures: step back to the last page that has workers.
    if (!state.rows.length && state.pageIndex > 0) {
      state.pageIndex -= 1;
      state.cursors.length = state.pageIndex + 1;
      return loadWorkers();
    }
    renderWorkers();
  }

  function refreshPageSoon() {
    if (state.pageRefresh) return;
    state.pageRefresh = setTimeout(async () => {
      state.pageRefresh = null;
      try {
        await loadWorkers();
      } catch (error) {
        showProblem(`controller unreachable: ${error.message}`);
      }
    }, PAGE_REFRESH_DELAY_MS);
  }

  function firstPage() {
    state.cursors = [null];
    state.pageIndex = 0;
    loadWorkers().catch((error) => showProblem(error.message));
  }

  function heartbeatAge(entry) {
    const heard = Date.parse(entry.last_heartbeat);
    return Number.isNaN(heard) ? "–" : `${duration((controllerNowMs() - heard) / 1000)} ago`;
  }

  function renderWorkers() {
    const fragment = document.createDocumentFragment();
    for (const entry of state.rows) {
      const row = element("tr");
      row.dataset.workerId = entry.worker_id;
      row.dataset.state = entry.state;
      const url = element("td", entry.worker_url, "url");
      const age = element("td", heartbeatAge(entry), "number age");
      age.title = entry.last_heartbeat;
      row.append(
        element("td", entry.worker_id, "id"),
        url,
        stateCell(entry),
        age,
        element("td", loadText(entry.load)),
      );
      row.title = (entry.capabilities || []).join(", ");
      fragment.append(row);
    }
    $("worker-rows").replaceChildren(fragment);
    $("workers-empty").hidden = state.rows.length > 0;
    const filtered = state.filter.capability || state.filter.state;
    $("worker-matching").textContent =
      state.matching === null
        ? ""
        : filtered
          ? `(${numbers.format(state.matching)} of ${numbers.format(state.total)})`
          : `(${numbers.format(state.total)})`;
    const first = state.pageIndex * state.pageSize;
    const pages = Math.max(1, Math.ceil((state.matching || 0) / state.pageSize));
    $("page-position").textContent = state.rows.length
      ? `page ${numbers.format(state.pageIndex + 1)} of ${numbers.format(pages)} · ` +
        `${numbers.format(first + 1)}–${numbers.format(first + state.rows.length)}`
      : "";
    $("first-page").disabled = $("previous-page").disabled = state.pageIndex === 0;
    $("next-page").disabled = !state.nextCursor;
  }

  // The listed state: an ejected worker's says how long its ejection lasts still
  // ("ejected · 25s"); a draining or ejected worker's health is in its title.
  function stateCell(entry) {
    const cell = element("td", stateText(entry), `state ${entry.state}`);
    const notes = [];
    if (entry.draining) notes.push("draining");
    if (entry.ejected_until) notes.push(`ejected until ${entry.ejected_until}`);
    if (notes.length && entry.health) notes.push(`health: ${entry.health}`);
    if (notes.length) cell.title = notes.join("; ");
    return cell;
  }

  function stateText(entry) {
    const until = entry.ejected_until ? Date.parse(entry.ejected_until) : NaN;
    if (entry.state !== "ejected" || Number.isNaN(until)) return entry.state;
    return `${entry.state} · ${duration(Math.max(0, (until - controllerNowMs()) / 1000))}`;
  }

  function tickAges() {
    const ages = document.querySelectorAll("#worker-rows td.age");
    const states = document.querySelectorAll("#worker-rows td.state");
    state.rows.forEach((entry, index) => {
      if (ages[index]) ages[index].textContent = heartbeatAge(entry);
      if (states[index]) states[index].textContent = stateText(entry);
    });
  }

  function rowMatches(entry) {
    if (state.filter.state && entry.state !== state.filter.state) return false;
    if (state.filter.capability) {
      const [verb, capability] = splitLabel(state.filter.capability);
      return (entry.capabilities || []).some((label) => label === `${verb}:${capability}`);
    }
    return true;
  }

  // ----------------------------------------------------------- feed events

  // Applies one change to the capability table and the rows shown; true when the
  // worker page may hold other workers now (it is read again, debounced).
  function apply(event) {
    const id = event.worker_id;
    const index = state.rows.findIndex((entry) => entry.worker_id === id);
    const shown = index >= 0 ? state.rows[index] : null;
    let reread = false;
    switch (event.type) {
      case "registered":
      case "imported": {
        withdraw(id);
        state.draining.delete(id); // a new record: not draining
        const healthy = event.type === "registered";
        offer(id, event.capabilities, healthy);
        const labels = event.capabilities.map((c) => `${c.verb}:${c.name}`);
        const entry = {
          ...(shown || {}),
          worker_id: id,
          worker_url: event.worker_url,
          capabilities: labels,
          state: healthy ? "healthy" : "unverified",
          health: healthy ? "healthy" : "unverified",
          draining: false,
          is_healthy: healthy,
          last_heartbeat: new Date((healthy ? event.at : event.last_heartbeat) * 1000).toISOString(),
        };
        if (shown) {
          if (rowMatches(entry)) state.rows[index] = entry;
          else state.rows.splice(index, 1);
        }
        // A newcomer may belong on this page; an import's state is the controller's to say.
        reread = !shown || !healthy;
        break;
      }
      case "deregistered":
      case "evicted":
        withdraw(id);
        state.draining.delete(id);
        state.departed.set(id, event.revision);
        if (shown) state.rows.splice(index, 1);
        reread = shown !== null;
        break;
      case "healthy":
      case "unhealthy": {
        const healthy = event.type === "healthy";
        const draining = state.draining.has(id); // routable again only when not draining
        forEachOffer(id, (members) => {
          if (healthy && !draining) members.healthy.add(id);
          else members.healthy.delete(id);
        });
        if (shown) {
          shown.health = event.type;
          shown.state = draining ? "draining" : event.type;
          shown.is_healthy = healthy && !draining;
          if (healthy) shown.last_heartbeat = new Date(event.at * 1000).toISOString();
          if (!rowMatches(shown)) state.rows.splice(index, 1);
        }
        reread = Boolean(state.filter.state);
        break;
      }
      case "draining":
        state.draining.add(id);
        forEachOffer(id, (members) => members.healthy.delete(id));
        if (shown) {
          shown.state = "draining";
          shown.draining = true;
          shown.is_healthy = false;
          if (!rowMatches(shown)) state.rows.splice(index, 1);
        }
        reread = Boolean(state.filter.state);
        break;
      case "undrained":
        // Routable again as its health allows, which the controller knows: read it again.
        state.draining.delete(id);
        if (shown) shown.draining = false;
      // falls through: read what the controller shows again
      case "ejected":
      case "restored":
        // Outlier ejection: the controller's fold may drop either (the ejected share's
        // cap, a restoration of an ejection already over), so read what it shows again.
        reread = true;
        refreshCapabilitiesSoon();
        break;
      default:
        // A change this page does not know (a newer controller): read what it shows again.
        reread = true;
        refreshCapabilitiesSoon();
    }
    return reread;
  }

  let capabilitiesRefresh = null;
  function refreshCapabilitiesSoon() {
    if (capabilitiesRefresh) return;
    capabilitiesRefresh = setTimeout(async () => {
      capabilitiesRefresh = null;
      try {
        await loadCapabilities();
      } catch (error) {
        showProblem(error.message);
      }
    }, PAGE_REFRESH_DELAY_MS);
  }

  function onChanges(events) {
    let reread = false;
    for (const event of events) {
      if (apply(event)) reread = true;
      state.changes.unshift(event);
    }
    state.changes.length = Math.min(state.changes.length, CHANGES_KEPT);
    state.revision = events[events.length - 1].revision;
    showProblem("");
    renderCapabilities();
    renderWorkers();
    renderChanges();
    renderStatus();
    refreshHealthSoon();
    if (reread) refreshPageSoon();
  }

  // Changes went by that the feed could not hand over: read what is shown again.
  function onGap(revision) {
    state.revision = revision;
    renderStatus();
    refreshCapabilitiesSoon();
    refreshPageSoon();
    refreshHealthSoon();
  }

  function changeTime(event) {
    return event.at !== undefined ? clockTime(event.at) : "–";
  }

  function renderChanges() {
    const fragment = document.createDocumentFragment();
    for (const event of state.changes) {
      const row = element("tr");
      row.dataset.revision = event.revision;
      row.append(
        element("td", numbers.format(event.revision), "number"),
        element("td", changeTime(event)),
        element("td", event.type, `change ${event.type}`),
        element("td", event.worker_id, "id"),
      );
      fragment.append(row);
    }
    $("change-rows").replaceChildren(fragment);
    $("changes-empty").hidden = state.changes.length > 0;
  }

  function setFeedState(status, detail) {
    const badge = $("feed-status");
    badge.textContent = status === "live" ? `live (${detail})` : status;
    badge.className = `feed ${status}`;
    badge.title = detail || "";
    if (status === "retrying") showProblem(`lost the controller's feed: ${detail}; retrying`);
    else showProblem("");
  }

  // -------------------------------------------------------------- loading

  // Reads everything again and follows the feed from the revision health gave:
  // events after it that the listings already show are applied again, harmlessly.
  async function loadAll() {
    if (state.feed) state.feed.stop();
    state.feed = null;
    const health = await loadHealth();
    state.epoch = health.epoch || null;
    state.revision = health.revision === undefined ? null : health.revision;
    await Promise.all([loadCapabilities(), loadWorkers()]);
    renderStatus();
    await loadRecentChanges();
    if (state.revision === null) {
      setFeedState("not live", "this controller has no revision in /health");
      return;
    }
    if (state.streams === null) state.streams = await streamsChanges();
    const Feed = state.streams ? EventSourceFeed : LongPollFeed;
    state.feed = new Feed({
      epoch: state.epoch,
      since: state.revision,
      onChanges,
      onLost: (error) => {
        setFeedState("reloading", error.message);
        reload();
      },
      onGap,
      onState: setFeedState,
    });
    state.feed.start();
  }

  // The last few changes before the page opened, when the feed still holds them.
  async function loadRecentChanges() {
    if (state.revision === null || state.changes.length) return;
    const since = Math.max(0, state.revision - 20);
    if (since === state.revision) return;
    try {
      const answer = await getJson(
        `watch${query({ epoch: state.epoch, since, timeout: 0.001 })}`,
      );
      state.changes = answer.events.filter((e) => e.revision <= state.revision).reverse();
    } catch (error) {
      state.changes = [];
    }
    renderChanges();
  }

  async function reload() {
    if (state.loading) return state.loading;
    state.loading = (async () => {
      for (let attempt = 0; ; attempt += 1) {
        try {
          await loadAll();
          showProblem("");
          return;
        } catch (error) {
          showProblem(`controller unreachable: ${error.message}; retrying`);
          await sleep(Math.min(1000 * 2 ** attempt, RETRY_MAX_MS));
        }
      }
    })();
    try {
      await state.loading;
    } finally {
      state.loading = null;
    }
  }

  // ------------------------------------------------------------- controls

  function wireControls() {
    $("filter-capability").addEventListener("change", (e) => chooseCapability(e.target.value));
    $("filter-state").addEventListener("change", (e) => {
      state.filter.state = e.target.value;
      firstPage();
    });
    $("page-size").addEventListener("change", (e) => {
      state.pageSize = Number(e.target.value);
      firstPage();
    });
    $("worker-filter").addEventListener("submit", (e) => e.preventDefault());
    $("capability-filter").addEventListener("submit", (e) => e.preventDefault());
    $("capability-search").addEventListener("input", (e) => {
      state.capabilitySearch = e.target.value;
      state.capabilityPage = 0;
      renderCapabilities();
    });
    $("previous-capabilities").addEventListener("click", () => {
      state.capabilityPage = Math.max(0, state.capabilityPage - 1);
      renderCapabilities();
    });
    $("next-capabilities").addEventListener("click", () => {
      state.capabilityPage += 1; // renderCapabilities keeps it within the pages found
      renderCapabilities();
    });
    $("first-page").addEventListener("click", firstPage);
    $("previous-page").addEventListener("click", () => {
      if (state.pageIndex === 0) return;
      state.pageIndex -= 1;
      state.cursors.length = state.pageIndex + 1;
      loadWorkers().catch((error) => showProblem(error.message));
    });
    $("next-page").addEventListener("click", () => {
      if (!state.nextCursor) return;
      state.cursors.push(state.nextCursor);
      state.pageIndex += 1;
      loadWorkers().catch((error) => showProblem(error.message));
    });
  }

  function start() {
    state.pageSize = Number($("page-size").value);
    wireControls();
    reload();
    setInterval(() => {
      renderStatus();
      tickAges();
    }, 1000);
    setInterval(refreshHealthSoon, HEALTH_EVERY_MS);
    setInterval(refreshPageSoon, WORKERS_EVERY_MS);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
