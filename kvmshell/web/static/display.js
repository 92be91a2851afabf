// The display: noVNC over /ws, carrying `kvmshell vnc VM`'s RFB stream.
// The WebSocket is opened (and its ticket sent) here, then handed to noVNC.
import RFB from './vendor/novnc/core/rfb.js';
import {openStream, say} from './common.js';

const box = document.getElementById('screen');
const vm = box.dataset.vm;
try {
  const ws = await openStream(vm, 'vnc');
  ws.addEventListener('close', (ev) => {
    box.dataset.state = 'closed';
    if (ev.code !== 1000 && ev.reason) say(ev.reason, true);
  });
  const rfb = new RFB(box, ws, {shared: true});
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => { box.dataset.state = 'connected'; });
  rfb.addEventListener('disconnect', () => { box.dataset.state = 'closed'; });
  window.kvmshellRfb = rfb;       // for the browser test and the curious
  box.dataset.state = 'open';
} catch (e) {
  box.dataset.state = 'refused';
  say(e.message, true);
}
