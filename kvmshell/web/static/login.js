// The login form: POST /login as JSON (the server checks Origin; there is
// no session, so no CSRF token, before login).
const form = document.getElementById('login');
const message = document.getElementById('message');
form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  message.textContent = '';
  const body = {user: form.user.value, password: form.password.value};
  const r = await fetch('/login', {
    method: 'POST', credentials: 'same-origin',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
  });
  if (r.ok) { location.assign('/'); return; }
  let doc = {};
  try { doc = await r.json(); } catch (e) { doc = {error: `HTTP ${r.status}`}; }
  form.password.value = '';
  message.textContent = doc.error || 'login failed';
  message.classList.add('error');
});
