// The chatsvc playground: talk to the service from a browser. No build step, no dependencies.
// Sending uses the seed's ChatClient (chat_client.js, unchanged); everything else is fetch.
'use strict';

const API = '/api/v1';
const $ = (selector) => document.querySelector(selector);

// ── The API token (CHATSVC_API_TOKEN): kept in this browser, added to every /api/ request ──
// ChatClient knows nothing of tokens, so fetch and EventSource themselves carry it: a header for
// fetch, ?access_token= for EventSource (which cannot send headers).
const TOKEN_KEY = 'chatsvc.playground.token';
const token = () => localStorage.getItem(TOKEN_KEY) || '';
const isApi = (url) => new URL(url, location.href).pathname.startsWith(API + '/');

const nativeFetch = window.fetch.bind(window);
window.fetch = (url, options = {}) => {
    if (token() && isApi(url)) {
        options = {...options, headers: {...(options.headers || {}), Authorization: `Bearer ${token()}`}};
    }
    return nativeFetch(url, options);
};

const NativeEventSource = window.EventSource;
let lastSource = null; // the EventSource a ChatClient call just opened: the page also reads its reasoning
window.EventSource = class extends NativeEventSource {
    constructor(url, options) {
        if (token() && isApi(url)) {
            const withToken = new URL(url, location.href);
            withToken.searchParams.set('access_token', token());
            url = withToken.href;
        }
        super(url, options);
        lastSource = this;
    }
};

// ── Calls ──
class ApiError extends Error {
    constructor(status, body) {
        super(body.detail || `HTTP ${status}`);
        this.status = status;
        this.code = body.code;
    }
}

async function api(method, path, body) {
    const options = {method, headers: {}};
    if (body !== undefined) {
        options.headers['Content-Type'] = 'application/json';
        options.body = JSON.stringify(body);
    }
    const response = await fetch(API + path, options);
    if (response.status === 204) return null;
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
        // The API token's 401 says `WWW-Authenticate: Bearer`; a missing CHATSVC_USER_HEADER's does not.
        if (response.status === 401 && response.headers.has('WWW-Authenticate')) askForToken(data.detail);
        throw new ApiError(response.status, data);
    }
    return data;
}

const conversationPath = (id) => `/context/conversations/${encodeURIComponent(id)}`;

// ── Markdown: answers (and their reasoning) rendered by marked, sanitized by DOMPurify ──
// No HTML from a message runs: its HTML is shown as text, and marked's output goes through DOMPurify (HTML only: no SVG or MathML,
// no style, no forms, no images, which would load from wherever a message points), links open in a
// new tab without an opener or a Referer. Code blocks are highlighted (highlight.js's common build)
// and get a copy button. While an answer streams, its text is rendered at most once per animation
// frame into a detached node that replaces the old one in one step (no flicker, no half-drawn frame).
const PURIFY = {
    USE_PROFILES: {html: true},
    FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select', 'img', 'video', 'audio', 'source', 'picture'],
    FORBID_ATTR: ['style', 'srcset', 'action', 'formaction'],
};
DOMPurify.addHook('afterSanitizeAttributes', (node) => {
    if (node.tagName === 'A') {
        if (node.hasAttribute('href')) {
            node.setAttribute('target', '_blank');
            node.setAttribute('rel', 'noopener noreferrer');
        } else {
            node.removeAttribute('target');
        }
    }
});

// HTML written in a message is shown as the text it is (a chat's answer often talks about HTML):
// marked escapes it, so the sanitizer sees only marked's own markup (and a browser is never asked to
// parse a message's event handlers, which Chrome reports as policy violations even in a parsed copy).
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const renderer = new marked.Marked({gfm: true, breaks: false, async: false, renderer: {html: ({text}) => escapeHtml(text)}});

function markdown(text) {
    const html = renderer.parse(text);
    const fragment = DOMPurify.sanitize(html, {...PURIFY, RETURN_DOM_FRAGMENT: true});
    for (const code of fragment.querySelectorAll('pre > code')) {
        const language = [...code.classList].find((c) => c.startsWith('language-'))?.slice(9);
        const source = code.textContent;
        try {
            const result = language && hljs.getLanguage(language) ? hljs.highlight(source, {language}) : hljs.highlightAuto(source);
            // highlight.js escapes the code it is given; its spans are sanitized again all the same
            code.replaceChildren(DOMPurify.sanitize(result.value, {...PURIFY, RETURN_DOM_FRAGMENT: true}));
            code.classList.add('hljs');
        } catch {
            // (shown as plain text)
        }
        const pre = code.parentElement;
        const block = document.createElement('div');
        block.className = 'code-block';
        const copy = document.createElement('button');
        copy.type = 'button';
        copy.className = 'copy';
        copy.textContent = 'Copy';
        copy.setAttribute('aria-label', 'Copy code');
        copy.addEventListener('click', () => copyText(source, copy));
        pre.replaceWith(block);
        block.append(copy, pre);
        pre.tabIndex = 0; // a wide block scrolls sideways: reachable by keyboard
    }
    return fragment;
}

async function copyText(text, button) {
    try {
        await navigator.clipboard.writeText(text);
        button.textContent = 'Copied';
    } catch {
        button.textContent = 'Copy failed';
    }
    setTimeout(() => (button.textContent = 'Copy'), 1500);
}

// Render `text` into `element` (at most once a frame while chunks arrive).
function renderInto(element, text) {
    element.dataset.source = text;
    if (element.pendingFrame) return;
    element.pendingFrame = requestAnimationFrame(() => {
        element.pendingFrame = 0;
        const source = element.dataset.source;
        if (source === element.dataset.rendered) return;
        element.dataset.rendered = source;
        const node = document.createElement('div');
        node.className = 'markdown';
        node.append(markdown(source));
        element.replaceChildren(node);
        followLatest();
    });
}

// ── Files: uploads from the composer, and the files of messages ──
// A file's bytes never change under its id, so a message's image is fetched once (with the page's
// token, which an <img src> could not carry) and shown from a blob: URL; a file this page uploaded
// is shown from its local copy, with no round trip.
const fileUrls = new Map(); // file id -> Promise of a blob: URL of its bytes

function fileUrl(id) {
    if (!fileUrls.has(id)) {
        const loading = fetch(`${API}/files/${encodeURIComponent(id)}/content`).then(async (response) => {
            if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
            return URL.createObjectURL(await response.blob());
        });
        loading.catch(() => fileUrls.delete(id)); // (tried again the next time it is shown)
        fileUrls.set(id, loading);
    }
    return fileUrls.get(id);
}

function fileSize(bytes) {
    if (bytes < 1000) return `${bytes} B`;
    if (bytes < 1_000_000) return `${(bytes / 1000).toFixed(1)} kB`;
    return `${(bytes / 1_000_000).toFixed(1)} MB`;
}

const chipText = (name, size) => `${name} · ${fileSize(size)}`;

// A message's files: images as thumbnails, documents as chips that download the file.
function showFiles(item, files) {
    const list = item.querySelector('.files');
    list.replaceChildren(...files.map((file) => {
        const entry = document.createElement('li');
        if (file.kind === 'image') {
            const image = document.createElement('img');
            image.className = 'thumb';
            image.alt = file.name;
            if (file.width && file.height) [image.width, image.height] = thumbSize(file.width, file.height);
            fileUrl(file.id).then((url) => (image.src = url), () => (image.alt = `${file.name} (not available)`));
            entry.append(image);
        } else {
            const chip = document.createElement('button');
            chip.type = 'button';
            chip.className = 'chip';
            chip.textContent = chipText(file.name, file.size);
            chip.title = `Download ${file.name}`;
            chip.addEventListener('click', () => download(file));
            entry.append(chip);
        }
        return entry;
    }));
    list.hidden = files.length === 0;
}

function thumbSize(width, height) {
    const scale = Math.min(1, 160 / width, 120 / height);
    return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

async function download(file) {
    let url;
    try {
        url = await fileUrl(file.id);
    } catch (error) {
        notice(error.message);
        return;
    }
    const link = document.createElement('a');
    link.href = url;
    link.download = file.name;
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
}

// The composer's files: each uploads as soon as it is attached, and shows a thumbnail (images, from
// the local file) or a chip "report.pdf · 1.2 MB", with a × that takes it off.
let attachments = []; // {file, url, id (once uploaded), uploading (a Promise), element}

function fileNotice(text) {
    $('#file-notice').textContent = text || '';
}

function attach(files) {
    fileNotice('');
    for (const file of files) {
        const attachment = {file, url: file.type.startsWith('image/') ? URL.createObjectURL(file) : null, id: null};
        attachment.element = attachmentItem(attachment);
        attachments.push(attachment);
        $('#attachments').append(attachment.element);
        attachment.uploading = upload(attachment);
    }
    showAttachments();
}

function attachmentItem(attachment) {
    const {file} = attachment;
    const name = file.name || 'pasted file';
    const entry = document.createElement('li');
    entry.className = 'attachment';
    entry.dataset.state = 'uploading';
    if (attachment.url) {
        const image = document.createElement('img');
        image.className = 'thumb';
        image.alt = name;
        image.src = attachment.url;
        entry.append(image);
    } else {
        const chip = document.createElement('span');
        chip.className = 'chip';
        chip.textContent = chipText(name, file.size);
        entry.append(chip);
    }
    const state = document.createElement('span');
    state.className = 'upload-state';
    state.textContent = 'Uploading…';
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'remove';
    remove.textContent = '×';
    remove.setAttribute('aria-label', `Remove ${name}`);
    remove.addEventListener('click', () => detach(attachment));
    entry.append(state, remove);
    return entry;
}

// POST /api/v1/files: the bytes as they are, named by ?name= (201 a new file, 200 the same bytes
// already stored: its id). A refusal (413, 415, 422) takes the file off and shows the service's detail.
async function upload(attachment) {
    const {file} = attachment;
    const name = file.name || (file.type.startsWith('image/') ? `pasted.${file.type.slice(6)}` : 'pasted file');
    const state = attachment.element.querySelector('.upload-state');
    const response = await postFile(`${API}/files?name=${encodeURIComponent(name)}`, file, (done) => {
        state.textContent = `Uploading… ${Math.floor(done * 100)} %`;
    });
    const data = response ? response.data : {};
    if (!attachments.includes(attachment)) return; // taken off meanwhile
    if (!response || !response.ok) {
        detach(attachment);
        fileNotice(data.detail || (response ? `${name} was refused (HTTP ${response.status}).` :
            'The service could not be reached.'));
        return;
    }
    if (attachments.some((other) => other.id === data.id)) {
        detach(attachment);
        fileNotice(`${data.name} is already attached.`);
        return;
    }
    attachment.id = data.id;
    attachment.meta = data;
    if (attachment.url) fileUrls.set(data.id, Promise.resolve(attachment.url)); // shown again without a fetch
    attachment.element.dataset.state = 'ready';
    attachment.element.querySelector('.upload-state').textContent = '';
}

// An upload with its progress (XMLHttpRequest: fetch says nothing of a body on its way), carrying
// the token as the page's fetch does; {status, ok, data} or null when the service was not reached.
function postFile(url, file, progress) {
    return new Promise((resolve) => {
        const request = new XMLHttpRequest();
        request.open('POST', url);
        request.setRequestHeader('Content-Type', file.type || 'application/octet-stream');
        if (token()) request.setRequestHeader('Authorization', `Bearer ${token()}`);
        request.upload.addEventListener('progress', (event) => {
            if (event.lengthComputable && event.total) progress(event.loaded / event.total);
        });
        request.addEventListener('load', () => {
            let data = {};
            try {
                data = JSON.parse(request.responseText);
            } catch {
                // (not JSON: the status says what happened)
            }
            if (request.status === 401 && request.getResponseHeader('WWW-Authenticate')) askForToken(data.detail);
            resolve({status: request.status, ok: request.status >= 200 && request.status < 300, data});
        });
        request.addEventListener('error', () => resolve(null));
        request.send(file);
    });
}

function detach(attachment) {
    attachments = attachments.filter((other) => other !== attachment);
    attachment.element.remove();
    if (attachment.url && !attachment.id) URL.revokeObjectURL(attachment.url);
    showAttachments();
}

function showAttachments() {
    $('#attachments').hidden = attachments.length === 0;
    $('#message').required = attachments.length === 0; // a message may be files only
}

// The attached files once every upload ended (those refused are gone by then).
async function uploadedFiles() {
    await Promise.all(attachments.map((a) => a.uploading));
    return attachments.filter((a) => a.id).map((a) => a.meta);
}

function clearAttachments() {
    attachments = [];
    $('#attachments').replaceChildren();
    fileNotice('');
    showAttachments();
}

// ── What the page shows ──
let current = null; // the open conversation's session id (also in the address: #<id>)
let busy = false; // an answer of the open conversation is streaming here
let following = null; // the EventSource following an answer this page did not send

function notice(text) {
    $('#notice').textContent = text || '';
}

function askForToken(detail) {
    $('#forget-token').hidden = true;
    $('#token-form').hidden = false;
    $('#token-help').textContent = detail || 'This service needs its API token.';
    $('#token').focus();
}

function setBusy(value) {
    busy = value;
    $('#send').disabled = value;
    $('#stop').disabled = !value;
    // (a version button at the first or last version stays disabled)
    document.querySelectorAll('.edit, .regenerate, .continue, .fork, .delete-message, .send-results, .versions button').forEach((b) => (b.disabled = value || 'edge' in b.dataset));
}

async function loadConversations() {
    const q = $('#search').value.trim();
    let page;
    try {
        page = await api('GET', '/context/conversations?limit=200' + (q ? `&q=${encodeURIComponent(q)}` : ''));
    } catch (error) {
        notice(error.message);
        return;
    }
    const list = $('#conversations');
    list.replaceChildren();
    for (const conversation of page.conversations) {
        const item = document.createElement('li');
        const button = document.createElement('button');
        button.type = 'button';
        button.className = 'conversation';
        button.textContent = conversation.title || conversation.session_id;
        if (conversation.session_id === current) button.setAttribute('aria-current', 'true');
        const at = conversation.match?.message_id || null;
        button.addEventListener('click', () => open(conversation.session_id, {at}));
        item.append(button);
        if (conversation.match?.snippet) {
            const snippet = document.createElement('p');
            snippet.className = 'snippet';
            snippet.append(...highlighted(conversation.match.snippet, q));
            item.append(snippet);
        }
        list.append(item);
    }
    $('#no-conversations').hidden = page.conversations.length > 0;
}

// A search snippet with each occurrence of the query in <mark> (text nodes only: nothing is parsed).
function highlighted(snippet, query) {
    const parts = [];
    const lower = snippet.toLowerCase();
    const needle = query.toLowerCase();
    let from = 0;
    for (let at = needle ? lower.indexOf(needle) : -1; at >= 0; at = lower.indexOf(needle, from)) {
        if (at > from) parts.push(snippet.slice(from, at));
        const mark = document.createElement('mark');
        mark.textContent = snippet.slice(at, at + needle.length);
        parts.push(mark);
        from = at + needle.length;
    }
    if (from < snippet.length) parts.push(snippet.slice(from));
    return parts;
}

// The app's own tools (the `tools` of a request), as OpenAI's function format in JSON; none when empty.
function appTools() {
    const text = $('#app-tools').value.trim();
    if (!text) return undefined;
    const tools = JSON.parse(text); // (a SyntaxError: the caller says so)
    return Array.isArray(tools) ? tools : [tools];
}

function messageItem(message, {leaf = false} = {}) {
    const item = $('#message-template').content.firstElementChild.cloneNode(true);
    item.classList.add(message.role);
    item.dataset.id = message.id || '';
    item.querySelector('.role').textContent = {user: 'You', tool: 'Tool results'}[message.role] || 'Assistant';
    showText(item, message.content || '', message.reasoning_content || '');
    showFiles(item, message.files || []);
    showState(item, message);
    item.querySelector('.steps').replaceChildren();
    for (const step of message.steps || []) showStep(item, step.type, step.data);
    if (message.role === 'tool') showToolResults(item, message.tool_results || []);
    if (leaf && message.finish_reason === 'tool_calls' && message.tool_calls?.length) {
        item.querySelector('.state').textContent = "Waiting for the app's tool results.";
        item.append(resultsForm(message.tool_calls));
    }
    const siblings = message.sibling_ids || [];
    if (siblings.length > 1) {
        const at = siblings.indexOf(message.id);
        const versions = item.querySelector('.versions');
        versions.hidden = false;
        versions.querySelector('.position').textContent = `${at + 1}/${siblings.length}`;
        const previous = versions.querySelector('.previous');
        const next = versions.querySelector('.next');
        if (at === 0) previous.dataset.edge = '';
        if (at === siblings.length - 1) next.dataset.edge = '';
        previous.disabled = 'edge' in previous.dataset;
        next.disabled = 'edge' in next.dataset;
        previous.addEventListener('click', () => switchTo(siblings[at - 1]));
        next.addEventListener('click', () => switchTo(siblings[at + 1]));
    }
    if (message.id && message.role === 'user' && !message.tool_results) {
        const edit = item.querySelector('.edit');
        edit.hidden = false;
        edit.addEventListener('click', () => startEdit(item, message));
    }
    if (message.id && message.role === 'assistant' && message.status !== 'streaming') {
        const regenerate = item.querySelector('.regenerate');
        regenerate.hidden = false;
        regenerate.addEventListener('click', () => answerAgain({regenerate: message.id}));
        if (canContinue(message, leaf)) {
            const more = item.querySelector('.continue');
            more.hidden = false;
            more.addEventListener('click', () => continueAnswer(item, message));
        }
    }
    if (message.id && message.status !== 'streaming') {
        const fork = item.querySelector('.fork');
        fork.hidden = false;
        fork.addEventListener('click', () => forkFrom(message.id));
        const remove = item.querySelector('.delete-message');
        remove.hidden = false;
        remove.setAttribute('aria-label', `Delete this message${message.role === 'user' ? ' and its answers' : ''}`);
        remove.addEventListener('click', () => deleteMessage(message.id));
    }
    showMeta(item, message);
    showSources(item, message.sources);
    if (message.summarized) item.classList.add('summarized'); // (the summary above stands for it)
    return item;
}

// An answer that ended early with text (stopped, interrupted, failed) or at the length limit can be
// continued (CONTRACT "Continuing an answer": the stream route with {"continue": <answer id>}), when it
// is its branch's last message (one with replies is refused) and waits for no tool results.
function canContinue(message, leaf) {
    if (!leaf || !message.content) return false;
    if (['tool_calls', 'tool_rounds'].includes(message.finish_reason)) return false;
    if (['stopped', 'interrupted', 'failed'].includes(message.status)) return true;
    return message.status === 'complete' && message.finish_reason === 'length';
}

// Small print under the role: when, and for an answer its model and tokens (in full on hover).
function showMeta(item, message) {
    const meta = item.querySelector('.meta');
    const parts = [];
    const titles = [];
    if (message.created_at) {
        const when = new Date(message.created_at);
        if (!Number.isNaN(when.getTime())) {
            parts.push(when.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'}));
            titles.push(when.toLocaleString());
        }
    }
    if (message.role === 'assistant' && message.model) parts.push(message.model);
    const usage = message.usage;
    if (message.role === 'assistant' && usage && typeof usage.total_tokens === 'number') {
        parts.push(`${usage.total_tokens} tokens`);
        titles.push(`${usage.prompt_tokens ?? '?'} tokens in, ${usage.completion_tokens ?? '?'} out`);
    }
    meta.textContent = parts.join(' · ');
    meta.title = titles.join('; ');
}

// Numbered links to the pages an answer drew on (issue 25's web search: `sources` on a stored
// message, in the `sources` event and in `end`); nothing when there are none.
function showSources(item, sources) {
    const list = item.querySelector('.sources');
    if (!list) return;
    const valid = Array.isArray(sources) ? sources.filter((s) => s && typeof s.url === 'string') : [];
    list.replaceChildren(...valid.map((source, k) => {
        const entry = document.createElement('li');
        entry.value = Number.isInteger(source.index) ? source.index : k + 1;
        const link = document.createElement('a');
        let safe = false;
        try {
            safe = ['http:', 'https:'].includes(new URL(source.url).protocol);
        } catch {
            safe = false;
        }
        if (safe) {
            link.href = source.url;
            link.target = '_blank';
            link.rel = 'noopener noreferrer';
        }
        link.textContent = source.title || source.url;
        entry.append(link);
        if (source.site) entry.append(` · ${source.site}`);
        return entry;
    }));
    list.hidden = valid.length === 0;
}

// A user's message is shown as the text it is (what was typed); an answer and its reasoning as Markdown.
function showText(item, content, reasoning) {
    const element = item.querySelector('.content');
    item.dataset.text = content;
    item.dataset.reasoning = reasoning;
    if (item.classList.contains('user')) {
        element.textContent = content;
    } else {
        renderInto(element, content);
    }
    const details = item.querySelector('.reasoning');
    details.hidden = !reasoning;
    if (reasoning) renderInto(details.querySelector('.reasoning-text'), reasoning);
    followLatest();
}

// A tool call folded under the answer like its reasoning: a <details> with the call's name, its
// arguments, and (once its tool_result came) the result or the error and how long it took.
function showStep(item, type, data) {
    const steps = item.querySelector('.steps');
    if (type === 'tool_call') {
        const call = $('#tool-call-template').content.firstElementChild.cloneNode(true);
        call.dataset.callId = data.id;
        call.querySelector('.tool-name').textContent = data.name;
        call.querySelector('.tool-outcome').textContent = data.server ? 'running…' : 'for the app';
        call.querySelector('.tool-arguments').textContent = data.arguments;
        steps.append(call);
    } else if (type === 'tool_result') {
        const call = [...steps.children].find((c) => c.dataset.callId === data.id);
        if (!call) return;
        const failed = data.error !== undefined && data.error !== null;
        call.dataset.outcome = data.outcome;
        call.querySelector('.tool-outcome').textContent = `${data.outcome}, ${data.duration_ms} ms`;
        call.querySelector('.tool-result-label').textContent = failed ? 'Error' : 'Result';
        call.querySelector('.tool-result').textContent = failed ? data.error : data.content;
        call.querySelector('.tool-result-part').hidden = false;
    }
}

// A tool-results turn (role "tool"): its results in one small folded block.
function showToolResults(item, results) {
    const block = document.createElement('details');
    block.className = 'tool-results';
    const summary = document.createElement('summary');
    summary.textContent = results.length === 1 ? '1 result' : `${results.length} results`;
    block.append(summary);
    for (const result of results) {
        const label = document.createElement('p');
        label.className = 'tool-label';
        label.textContent = result.tool_call_id;
        const text = document.createElement('pre');
        text.textContent = result.content;
        block.append(label, text);
    }
    item.querySelector('.content').replaceWith(block);
}

// The answer waits for the app's tools: a field per pending call, and the results sent as the next turn.
function resultsForm(calls) {
    const form = document.createElement('form');
    form.className = 'tool-results-form';
    const fields = calls.map((call) => {
        const label = document.createElement('label');
        const field = document.createElement('textarea');
        field.id = 'result-' + call.id;
        field.rows = 2;
        field.required = true;
        label.htmlFor = field.id;
        label.textContent = `result for ${call.name} (${call.id})`;
        form.append(label, field);
        return field;
    });
    const submit = document.createElement('button');
    submit.type = 'submit';
    submit.className = 'send-results';
    submit.textContent = 'Send results';
    submit.disabled = busy;
    form.append(submit);
    form.addEventListener('submit', (event) => {
        event.preventDefault();
        let tools;
        try {
            tools = appTools();
        } catch {
            notice('The app tools are not valid JSON.');
            return;
        }
        const results = calls.map((call, k) => ({tool_call_id: call.id, content: fields[k].value}));
        answerAgain({tool_results: results, ...(tools ? {tools} : {})});
    });
    return form;
}

function showState(item, message) {
    const words = {
        streaming: 'Writing…',
        stopped: 'Stopped.',
        interrupted: 'Interrupted: ' + (message.error?.message || ''),
        failed: 'Failed: ' + (message.error?.message || ''),
    };
    item.querySelector('.state').textContent = words[message.status] || '';
    item.dataset.status = message.status || '';
}

function showConversation(conversation, {at = null} = {}) {
    $('#title').textContent = conversation ? conversation.title || conversation.session_id : 'New conversation';
    $('#delete-conversation').hidden = !conversation;
    const messages = conversation ? conversation.messages : [];
    $('#messages').replaceChildren(...messages.map((m, k) => messageItem(m, {leaf: k === messages.length - 1})));
    showSettings(conversation);
    showSummary(conversation?.summary);
    showEmpty();
    setBusy(busy);
    const found = at && $('#messages').querySelector(`li[data-id="${CSS.escape(at)}"]`);
    if (found) {
        autoFollow = false;
        leftTop = -1;
        found.classList.add('found');
        focusOn = found; // (kept in view while the messages around it are rendered)
        found.scrollIntoView({block: 'center'});
        showJump();
    } else {
        toLatest();
    }
}

// A conversation's summary (issue 25): its earlier messages summarised, folded above them.
function showSummary(summary) {
    const note = $('#summary-note');
    const content = summary && typeof summary.content === 'string' ? summary.content : '';
    note.hidden = !content;
    if (!content) return;
    const covered = Number.isInteger(summary.covered) ? ` (${summary.covered} messages)` : '';
    note.querySelector('summary').textContent = `Earlier messages summarised${covered}`;
    renderInto(note.querySelector('.summary-text'), content);
}

// The first screen: what this is, the model in use, example prompts, and (before any send) what
// to do when the service has no model key.
let models = null; // GET /api/v1/models, once
function showEmpty() {
    const empty = !$('#messages').children.length && !current;
    $('#empty').hidden = !empty;
    if (!models) return;
    $('#empty-model').textContent = models.default;
    $('#no-key').hidden = models.configured !== false;
    $('#web-search-choice').hidden = models.web_search !== 'allowed'; // (always: every turn searches anyway)
}

// "Search the web" for the next messages (CHATSVC_WEB_SEARCH=allowed): `"web_search": true` on each.
const searchTheWeb = () => !$('#web-search-choice').hidden && $('#web-search').checked;

async function loadModels() {
    try {
        models = await api('GET', '/models');
    } catch {
        return; // (an older service: no picker, no warning)
    }
    const picker = $('#setting-model');
    picker.replaceChildren(...models.models.map((model) => {
        const option = document.createElement('option');
        option.value = model.id;
        option.textContent = model.default ? `${model.id} (default)` : model.id;
        return option;
    }));
    showEmpty();
}

// ── The open conversation's settings: title, model, system prompt; export ──
let shown = null; // the open conversation as last read
function showSettings(conversation) {
    shown = conversation;
    $('#settings').hidden = !conversation;
    if (!conversation) return;
    $('#setting-title').value = conversation.title || '';
    $('#setting-prompt').value = conversation.system_prompt || '';
    const picker = $('#setting-model');
    const model = conversation.model || models?.default || '';
    if (model && ![...picker.options].some((o) => o.value === model)) {
        const option = document.createElement('option');
        option.value = option.textContent = model;
        picker.append(option);
    }
    picker.value = model;
}

async function saveSettings() {
    if (!current || !shown) return;
    const body = {
        title: $('#setting-title').value.trim() || null,
        system_prompt: $('#setting-prompt').value.trim() ? $('#setting-prompt').value : null,
        model: $('#setting-model').value || null,
    };
    try {
        await api('PATCH', conversationPath(current), body);
    } catch (error) {
        notice(error.message);
        return;
    }
    notice('');
    await open(current, {keepNotice: true});
    $('#settings').open = true;
}

async function exportConversation(markdown) {
    if (!current) return;
    const response = await fetch(`${API}${conversationPath(current)}/export${markdown ? '?format=markdown' : ''}`).catch(() => null);
    if (!response || !response.ok) {
        const error = response ? await response.json().catch(() => ({})) : {};
        notice(error.detail || 'The service could not be reached.');
        return;
    }
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement('a');
    link.href = url;
    link.download = `${current}.${markdown ? 'md' : 'json'}`;
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function importConversation(file) {
    const response = await fetch(`${API}/context/conversations/import`, {
        method: 'POST', headers: {'Content-Type': 'application/json'}, body: file,
    }).catch(() => null);
    const data = response ? await response.json().catch(() => ({})) : {};
    if (!response || !response.ok) {
        notice(data.detail || 'The service could not be reached.');
        return;
    }
    await open(data.session_id);
}

async function forkFrom(messageId) {
    if (busy || !current) return;
    let fork;
    try {
        fork = await api('POST', conversationPath(current) + '/fork', {message_id: messageId});
    } catch (error) {
        notice(error.message);
        return;
    }
    await open(fork.session_id);
}

async function deleteMessage(messageId) {
    if (busy || !current || !confirm('Delete this message and everything after it on every branch?')) return;
    try {
        await api('DELETE', `${conversationPath(current)}/messages/${encodeURIComponent(messageId)}`);
    } catch (error) {
        notice(error.message);
        return;
    }
    await open(current, {keepNotice: true});
}

// Continue an answer (issue 25): its chunks are appended to the text it has.
let continuing = null; // {id, text}: the answer being continued and its text before
async function continueAnswer(item, message) {
    if (busy || !current) return;
    continuing = {id: message.id, text: message.content || ''};
    notice('');
    const refused = await post({continue: message.id});
    if (refused) {
        continuing = null;
        notice(refused);
    }
}

// ── Scrolling: the view follows a streaming answer unless the reader scrolled up ──
let autoFollow = true;
let focusOn = null; // a search's match, shown in the middle until the reader scrolls
// Where the list was when the reader scrolled up: only the reader's own scrolling back below it follows
// again, not a scroll event of the view's own still on its way (it fires a frame after the scroll).
let leftTop = -1;
const scroller = () => $('#messages');
const atBottom = () => {
    const list = scroller();
    return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
};
function toLatest() {
    autoFollow = true;
    focusOn = null;
    leftTop = -1;
    const list = scroller();
    list.scrollTop = list.scrollHeight;
    showJump();
}
function followLatest() {
    if (focusOn?.isConnected) {
        focusOn.scrollIntoView({block: 'center'});
    } else if (autoFollow) {
        const list = scroller();
        list.scrollTop = list.scrollHeight;
    }
    showJump();
}
function showJump() {
    $('#jump').hidden = autoFollow || atBottom();
}

// Open a conversation; an answer still being written is followed on its channel to the end
// (after a reload too: the answer belongs to the server, not to the page that asked for it).
async function open(id, {list = true, keepNotice = false, at = null} = {}) {
    stopFollowing();
    current = id;
    history.replaceState(null, '', id ? '#' + encodeURIComponent(id) : location.pathname);
    if (!keepNotice) notice('');
    document.body.classList.remove('nav-open');
    $('#nav-toggle').setAttribute('aria-expanded', 'false');
    if (!id) {
        setBusy(false);
        showConversation(null);
    } else {
        let conversation;
        try {
            conversation = await api('GET', conversationPath(id) + '?limit=500');
        } catch (error) {
            notice(error.message);
            return;
        }
        if (current !== id) return;
        setBusy(conversation.generating);
        showConversation(conversation, {at});
        if (conversation.generating) follow(id, {running: true});
    }
    if (list) await loadConversations();
}

const reload = () => open(current, {keepNotice: true}); // after an answer: its error stays shown

function stopFollowing() {
    if (following) following.close();
    following = null;
}

// Follow the conversation's channel: the running answer from its first event, or the next one.
// `running`: the page saw an answer running, which may end before the channel is open.
function follow(id, {running = false} = {}) {
    stopFollowing();
    const source = new EventSource(`${API}/chat/${encodeURIComponent(id)}/stream`);
    following = source;
    let item = null;
    let reasoning = '';
    let text = '';
    source.onopen = async () => {
        if (!running) return;
        // The answer may have ended between the page's read and this channel: read it again.
        const conversation = await api('GET', conversationPath(id) + '?limit=1').catch(() => null);
        if (following === source && conversation && !conversation.generating && !item) {
            stopFollowing();
            setBusy(false);
            reload();
        }
    };
    source.onmessage = (event) => {
        const {type, data} = JSON.parse(event.data);
        if (type === 'start') {
            item = document.querySelector(`#messages li[data-id="${CSS.escape(data.message_id)}"]`);
            if (!item) {
                item = messageItem({role: 'assistant', id: data.message_id, status: 'streaming'});
                $('#messages').append(item);
            }
            text = reasoning = '';
            if (data.continues) {
                // a continuation (this page's, another tab's, or one running at a reload): its chunks
                // follow the stored text it goes on from, the first `continues.chars` of the answer's text
                const before = continuing && continuing.id === data.message_id ? continuing.text : item.dataset.text || '';
                const at = Number.isInteger(data.continues.chars) ? data.continues.chars : before.length;
                text = before.slice(0, at);
                reasoning = item.querySelector('.reasoning').hidden ? '' : item.dataset.reasoning || '';
                item.querySelector('.continue').hidden = true;
                item.dataset.status = 'streaming';
                item.querySelector('.state').textContent = 'Writing…';
            } else {
                item.querySelector('.steps').replaceChildren();
            }
            showText(item, text, reasoning);
        } else if (item && (type === 'tool_call' || type === 'tool_result')) {
            showStep(item, type, data);
        } else if (item && type === 'reasoning') {
            reasoning += data.content;
            showText(item, text, reasoning);
        } else if (item && type === 'chunk') {
            text += data.content;
            showText(item, text, reasoning);
        } else if (item && type === 'sources') {
            showSources(item, data.sources);
        } else if (type === 'end' || type === 'error') {
            continuing = null;
            if (type === 'error') notice(data.message);
            stopFollowing();
            setBusy(false);
            reload();
        }
    };
    source.onerror = () => {
        if (source.readyState === NativeEventSource.CLOSED) {
            stopFollowing();
            setBusy(false);
            notice('The connection to the service was lost.');
        }
    };
}

// ── Actions ──
function newSessionId() {
    return 'c-' + Date.now().toString(36) + '-' + Math.random().toString(36).slice(2, 8);
}

// Send with the seed's ChatClient: its callbacks draw the answer as its chunks arrive. With files
// (which ChatClient cannot send) or the app's tools, the page posts itself.
async function send(text, files = []) {
    let tools;
    try {
        tools = appTools();
    } catch {
        if (!$('#message').value) $('#message').value = text;
        notice('The app tools are not valid JSON.');
        return;
    }
    const id = current || newSessionId();
    const isNew = !current;
    if (isNew) {
        current = id;
        history.replaceState(null, '', '#' + encodeURIComponent(id));
        $('#title').textContent = (text.trim() ? text.split('\n')[0] : files[0].name).slice(0, 60);
        $('#delete-conversation').hidden = false;
    }
    notice('');
    setBusy(true);
    const question = messageItem({role: 'user', content: text, files, status: 'complete'});
    const search = searchTheWeb();
    if (tools || files.length || search) {
        // ChatClient sends only the message: with files, the app's tools or a search the page posts itself (as answerAgain)
        $('#messages').append(question);
        showEmpty();
        toLatest();
        const body = {message: text, ...(tools ? {tools} : {}), ...(search ? {web_search: true} : {})};
        if (files.length) body.files = files.map((f) => f.id);
        const refused = await post(body);
        if (refused) {
            // nothing was stored: the text goes back to the composer, whose files stay attached
            question.remove();
            if (!$('#message').value) $('#message').value = text;
            if (isNew && current === id) open(null, {list: false});
            notice(refused);
        } else {
            clearAttachments();
        }
        return;
    }
    const item = messageItem({role: 'assistant', status: 'streaming'});
    $('#messages').append(question, item);
    showEmpty();
    toLatest();
    let reasoning = '';
    let done = false;
    const finish = (message) => {
        if (done) return;
        done = true;
        if (message) notice(message);
        setBusy(false);
        if (current === id) reload();
        else loadConversations();
    };
    const client = new ChatClient(id);
    const sending = client.streamChat(text, {
        onStart: () => showText(item, '', ''),
        onChunk: (chunk, fullText) => showText(item, fullText, reasoning),
        onEnd: () => finish(),
        onError: (error) => finish(error && error.message ? error.message : 'The connection to the service was lost.'),
    });
    const source = lastSource; // ChatClient's: it ignores reasoning, the page shows it folded
    source.addEventListener('message', (event) => {
        const {type, data} = JSON.parse(event.data);
        if (type === 'reasoning' && !done) {
            reasoning += data.content;
            showText(item, item.dataset.text || '', reasoning);
        } else if ((type === 'tool_call' || type === 'tool_result') && !done) {
            showStep(item, type, data); // (the server's tools of an answer to a plain message)
        } else if (type === 'sources' && !done) {
            showSources(item, data.sources);
        }
    });
    try {
        await sending;
    } catch (error) {
        // Refused (nothing was stored): the text goes back to the composer, the detail is shown.
        source.close(); // the seed client leaves its EventSource open when the POST is refused
        done = true;
        question.remove();
        item.remove();
        if (!$('#message').value) $('#message').value = text;
        if (isNew && current === id) open(null, {list: false});
        notice(error.message);
        setBusy(false);
    }
}

// Regenerate an answer, or send an edited message: a POST like the seed client's, with the
// conversation's channel followed for the answer.
async function answerAgain(body) {
    if (busy || !current) return;
    notice('');
    const refused = await post(body);
    if (refused) notice(refused);
}

// POST `body` to the open conversation's streaming route, the answer drawn from its channel;
// what went wrong when it was refused (nothing was stored), else null.
async function post(body) {
    setBusy(true);
    follow(current);
    const response = await fetch(`${API}/chat/${encodeURIComponent(current)}/stream`, {
        method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify(body),
    }).catch(() => null);
    if (!response || !response.ok) {
        const error = response ? await response.json().catch(() => ({})) : {};
        stopFollowing();
        setBusy(false);
        return error.detail || 'The service could not be reached.';
    }
    return null;
}

function startEdit(item, message) {
    if (busy) return;
    const form = document.createElement('form');
    form.className = 'editor';
    const label = document.createElement('label');
    const field = document.createElement('textarea');
    field.id = 'edit-' + message.id;
    label.htmlFor = field.id;
    label.textContent = 'Edit message';
    field.value = message.content;
    field.rows = 3;
    const files = message.files || []; // an edit replaces the message: its files are sent again
    const save = document.createElement('button');
    save.type = 'submit';
    save.textContent = 'Send edit';
    const cancel = document.createElement('button');
    cancel.type = 'button';
    cancel.textContent = 'Cancel';
    cancel.addEventListener('click', () => form.replaceWith(messageItem(message)));
    form.append(label, field, save, cancel);
    form.addEventListener('submit', (event) => {
        event.preventDefault();
        if (field.value.trim() || files.length) {
            answerAgain({message: field.value, edit: message.id, ...(files.length ? {files: files.map((f) => f.id)} : {})});
        }
    });
    const replacement = document.createElement('li');
    replacement.className = 'message user';
    replacement.append(form);
    item.replaceWith(replacement);
    field.focus();
}

async function switchTo(messageId) {
    if (busy) return;
    try {
        await api('PATCH', conversationPath(current), {current_message_id: messageId});
    } catch (error) {
        notice(error.message);
        return;
    }
    await open(current, {list: false});
}

async function stop() {
    if (!current) return;
    try {
        await api('POST', `/chat/${encodeURIComponent(current)}/stop`);
    } catch (error) {
        notice(error.message);
    }
}

async function deleteConversation() {
    if (!current || !confirm('Delete this conversation and all its messages?')) return;
    try {
        await api('DELETE', conversationPath(current));
    } catch (error) {
        notice(error.message);
        return;
    }
    await open(null);
}

// ── Wiring ──
let waitingForUploads = false; // Send was pressed while files were still uploading
$('#composer').addEventListener('submit', async (event) => {
    event.preventDefault();
    const field = $('#message');
    if (busy || waitingForUploads || (!field.value.trim() && !attachments.length)) return;
    let files = [];
    if (attachments.length) {
        waitingForUploads = true;
        $('#send').disabled = true;
        files = await uploadedFiles();
        waitingForUploads = false;
        setBusy(busy);
        if (busy || (!field.value.trim() && !files.length)) return;
    }
    const text = field.value;
    field.value = '';
    send(text, files);
});
$('#message').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $('#composer').requestSubmit();
    }
});
$('#stop').addEventListener('click', stop);
$('#attach-button').addEventListener('click', () => $('#attach').click());
$('#attach').addEventListener('change', (event) => {
    attach([...event.target.files]);
    event.target.value = ''; // the same file may be attached again after its ×
});
// Paste: the clipboard's files (a screenshot) are attached; its text, if any, is pasted as usual.
$('#message').addEventListener('paste', (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return;
    if (!event.clipboardData.types.includes('text/plain')) event.preventDefault();
    attach(files);
});
// Drop: files dropped anywhere on the composer are attached.
const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].includes('Files');
$('#composer').addEventListener('dragover', (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
    $('#composer').classList.add('dropping');
});
$('#composer').addEventListener('dragleave', (event) => {
    if (!$('#composer').contains(event.relatedTarget)) $('#composer').classList.remove('dropping');
});
$('#composer').addEventListener('drop', (event) => {
    $('#composer').classList.remove('dropping');
    if (!carriesFiles(event)) return;
    event.preventDefault();
    attach([...event.dataTransfer.files]);
});
$('#new-conversation').addEventListener('click', () => {
    open(null, {list: false});
    $('#message').focus();
});
$('#delete-conversation').addEventListener('click', deleteConversation);
let searching = null;
$('#search').addEventListener('input', () => {
    clearTimeout(searching);
    searching = setTimeout(loadConversations, 250);
});
$('#search-form').addEventListener('submit', (event) => {
    event.preventDefault();
    loadConversations();
});
$('#token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $('#token').value.trim());
    $('#token').value = '';
    $('#token-form').hidden = true;
    $('#forget-token').hidden = !token();
    open(current);
});
// The token stays in this browser (localStorage) until it is forgotten here or the site's data is cleared.
$('#forget-token').hidden = !token();
$('#forget-token').addEventListener('click', () => {
    localStorage.removeItem(TOKEN_KEY);
    $('#forget-token').hidden = true;
    open(current);
});

// Esc stops the answer being written (from anywhere on the page, unless a dialog-like field handles it).
document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && busy && !event.isComposing) {
        event.preventDefault();
        stop();
    }
});
$('#messages').addEventListener('scroll', () => {
    if (atBottom() && scroller().scrollTop > leftTop) autoFollow = true;
    showJump();
});
// Scrolling up (wheel, keys, touch) while an answer streams stops the view following it.
function leaveLatest() {
    autoFollow = false;
    focusOn = null;
    leftTop = scroller().scrollTop;
    showJump();
}
$('#messages').addEventListener('wheel', (event) => event.deltaY < 0 && leaveLatest(), {passive: true});
$('#messages').addEventListener('keydown', (event) => ['ArrowUp', 'PageUp', 'Home'].includes(event.key) && leaveLatest());
$('#messages').addEventListener('touchmove', () => setTimeout(() => (atBottom() ? null : leaveLatest())), {passive: true});
$('#jump').addEventListener('click', toLatest);
// A phone-wide screen folds the conversation list behind a button.
$('#nav-toggle').addEventListener('click', () => {
    const opened = document.body.classList.toggle('nav-open');
    $('#nav-toggle').setAttribute('aria-expanded', String(opened));
});
// Dark mode: the system's (prefers-color-scheme) until the toggle picks one, remembered here.
const THEME_KEY = 'chatsvc.playground.theme';
const systemDark = window.matchMedia('(prefers-color-scheme: dark)');
function applyTheme() {
    const dark = (localStorage.getItem(THEME_KEY) || (systemDark.matches ? 'dark' : 'light')) === 'dark';
    document.documentElement.dataset.theme = dark ? 'dark' : 'light';
    $('#code-dark').disabled = !dark;
    $('#code-light').disabled = dark;
    $('#theme').setAttribute('aria-pressed', String(dark));
}
$('#theme').addEventListener('click', () => {
    localStorage.setItem(THEME_KEY, document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark');
    applyTheme();
});
systemDark.addEventListener('change', applyTheme);
applyTheme();
$('#settings-form').addEventListener('submit', (event) => {
    event.preventDefault();
    saveSettings();
});
$('#export-json').addEventListener('click', () => exportConversation(false));
$('#export-markdown').addEventListener('click', () => exportConversation(true));
$('#import-button').addEventListener('click', () => $('#import').click());
$('#import').addEventListener('change', (event) => {
    const [file] = event.target.files;
    event.target.value = '';
    if (file) importConversation(file);
});
// An example prompt on the first screen: sent as it is.
document.querySelectorAll('#examples .example').forEach((button) => button.addEventListener('click', () => {
    if (busy) return;
    $('#message').value = button.textContent;
    $('#composer').requestSubmit();
}));
loadModels();

// The address names the open conversation (#<session_id>): a link or a reload opens it. Only a
// valid session id (chatsvc's rule) does: anything else in a link (`#other/stop?`, `#../x`) would
// make ChatClient, which puts the id into its URLs as it is, send to another route. It is ignored:
// the address goes back to naming the open conversation (or none).
const SESSION_ID = /^(?!\.+$)[A-Za-z0-9._-]{1,128}$/;
function fromAddress() {
    try {
        const id = decodeURIComponent(location.hash.slice(1));
        return SESSION_ID.test(id) ? id : null;
    } catch {
        return null; // not percent-encoded text: not an id
    }
}
window.addEventListener('hashchange', () => {
    const id = fromAddress();
    if (id === null && location.hash) {
        history.replaceState(null, '', current ? '#' + encodeURIComponent(current) : location.pathname);
    } else if (id !== current) {
        open(id);
    }
});
open(fromAddress()); // (open(null) clears an address that names no valid id)
