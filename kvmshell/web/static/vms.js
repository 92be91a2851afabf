// The VM list: stop/reset/kill buttons and the start form, each a POST with
// the CSRF token; kvmshell's one-line answer is shown as it is (textContent).
import {post, say} from './common.js';

async function act(vm, verb, body) {
  say(`${vm}: ${verb}...`, false);
  const [ok, doc] = await post(`/api/vms/${encodeURIComponent(vm)}/${verb}`, body);
  if (!ok) { say(doc.error || 'failed', true); return; }
  sessionStorage.setItem('kvmshell-message', doc.message || '');
  location.reload();
}

for (const button of document.querySelectorAll('#vms button[data-verb]')) {
  button.addEventListener('click', () => {
    const vm = button.closest('tr').dataset.vm;
    act(vm, button.dataset.verb, {});
  });
}

for (const form of document.querySelectorAll('form.start-form')) {
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const options = [];
    for (const input of form.querySelectorAll('input[data-option]')) {
      if (input.type === 'checkbox') {
        if (input.checked) options.push([input.dataset.option, true]);
      } else if (input.value !== '') {
        options.push([input.dataset.option, input.value]);
      }
    }
    act(form.dataset.vm, 'start', {options});
  });
}

const last = sessionStorage.getItem('kvmshell-message');
if (last) { say(last, false); sessionStorage.removeItem('kvmshell-message'); }
