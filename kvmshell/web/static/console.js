// The serial console: xterm.js over /ws, carrying `kvmshell console VM`'s
// byte stream (binary frames both ways).  Resizes are sent as
// {"resize": [cols, rows]}; the server answers with the stty hint, shown
// locally (a serial line has no window size).  Copy: select; paste: the
// browser's paste (xterm.js turns it into input).
import {Terminal} from './vendor/xterm/xterm.mjs';
import {FitAddon} from './vendor/xterm/addon-fit.mjs';
import {openStream, say} from './common.js';

const box = document.getElementById('terminal');
const vm = box.dataset.vm;
const kind = box.dataset.kind;
const term = new Terminal({
  convertEol: false, cursorBlink: true, scrollback: 5000,
  disableStdin: kind === 'spy', fontSize: 15,
});
const fit = new FitAddon();
term.loadAddon(fit);
term.open(box);
fit.fit();
window.kvmshellTerm = term;       // for the browser test and the curious

const encoder = new TextEncoder();

function notice(text) {
  term.write(`\r\n\x1b[2m[kvmshell: ${text}]\x1b[0m\r\n`);
}

try {
  const ws = await openStream(vm, kind);
  box.dataset.state = 'open';
  ws.onmessage = (ev) => {
    if (typeof ev.data === 'string') {
      let m = {};
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      if (m.notice) notice(m.notice);
      if (m.error) { say(m.error, true); notice(m.error); }
      return;
    }
    term.write(new Uint8Array(ev.data));
  };
  ws.onclose = (ev) => {
    box.dataset.state = 'closed';
    if (ev.code !== 1000 && ev.reason) say(ev.reason, true);
    notice('console closed');
  };
  if (kind !== 'spy') {
    term.onData((data) => { if (ws.readyState === 1) ws.send(encoder.encode(data)); });
    term.onBinary((data) => {
      const bytes = Uint8Array.from(data, (c) => c.charCodeAt(0));
      if (ws.readyState === 1) ws.send(bytes);
    });
  }
  let timer = null;
  const sendSize = () => {
    if (ws.readyState === 1) ws.send(JSON.stringify({resize: [term.cols, term.rows]}));
  };
  term.onResize(() => { clearTimeout(timer); timer = setTimeout(sendSize, 300); });
  window.addEventListener('resize', () => fit.fit());
  sendSize();
  term.focus();
} catch (e) {
  box.dataset.state = 'refused';
  say(e.message, true);
  notice(e.message);
}
