// kvmshell web front door: what every page after login shares.
// Every state-changing request carries the session's CSRF token in a
// header; no page has inline script (the CSP forbids it).

export function csrf() {
  const meta = document.querySelector('meta[name="kvmshell-csrf"]');
  return meta ? meta.content : '';
}

// POST a JSON body; resolves to [ok, answer-object].
export async function post(url, body) {
  const r = await fetch(url, {
    method: 'POST',
    credentials: 'same-origin',
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf()},
    body: JSON.stringify(body || {}),
  });
  let doc = {};
  try { doc = await r.json(); } catch (e) { doc = {error: `HTTP ${r.status}`}; }
  return [r.ok, doc];
}

export function say(text, isError) {
  const el = document.getElementById('message');
  if (el) {
    el.textContent = text || '';
    el.classList.toggle('error', !!isError);
  }
}

// A WebSocket to /ws for (vm, kind), its one-time ticket sent as the first
// message.  Resolves when the server answers {"ok"}; rejects with its line.
export async function openStream(vm, kind) {
  const [ok, doc] = await post('/api/tickets', {vm, kind});
  if (!ok) throw new Error(doc.error || 'no ticket');
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = 'arraybuffer';
  return new Promise((resolve, reject) => {
    ws.onopen = () => ws.send(JSON.stringify({ticket: doc.ticket}));
    ws.onmessage = (ev) => {
      let m = {};
      try { m = JSON.parse(ev.data); } catch (e) { m = {error: 'unexpected answer'}; }
      ws.onmessage = null;
      if (m.ok) resolve(ws); else reject(new Error(m.error || 'refused'));
    };
    ws.onclose = (ev) => reject(new Error(ev.reason || `connection closed (${ev.code})`));
  });
}

const logout = document.getElementById('logout');
if (logout) {
  logout.addEventListener('click', async () => {
    await post('/logout', {});
    location.assign('/login');
  });
}
