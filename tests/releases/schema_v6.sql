-- chatsvc schema, as numbered steps. A database records the steps it has had (schema_versions);
-- at start chatsvc applies, in order, each step it has not had, in one transaction each. A new
-- database gets every step, so the path an existing database takes is the path every database takes.
-- A released step is never edited: a change of the schema is a new step at the end.
-- Portable between SQLite and PostgreSQL. Times are RFC 3339 UTC text, which sorts in time order.
-- (No colons or percent signs in this file, the statements go through bind-parameter parsing.)

-- step 1: conversations and their messages
-- (the first release's schema: its databases recorded no version, and take this step as a no-op)

-- owner is the CHATSVC_USER_HEADER value ('' when that is not set), each owner has its own session ids
CREATE TABLE IF NOT EXISTS conversations (
    owner         TEXT NOT NULL DEFAULT '',
    session_id    TEXT NOT NULL,
    title         TEXT,
    system_prompt TEXT,
    model         TEXT,
    -- messages whose id is not above this are out of the model's context (clear context)
    context_start TEXT NOT NULL DEFAULT '',
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (owner, session_id)
);

CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations (owner, updated_at, session_id);

CREATE TABLE IF NOT EXISTS messages (
    -- time-ordered ids, so ordering by id is ordering by creation
    id                TEXT PRIMARY KEY,
    owner             TEXT NOT NULL DEFAULT '',
    session_id        TEXT NOT NULL,
    role              TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content           TEXT NOT NULL DEFAULT '',
    reasoning_content TEXT,
    status            TEXT NOT NULL
        CHECK (status IN ('complete', 'streaming', 'stopped', 'interrupted', 'failed')),
    model             TEXT,
    finish_reason     TEXT,
    error_code        TEXT,
    error_message     TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    total_tokens      INTEGER,
    -- sequence number of the answer's last event, so a resumed stream can name it
    last_seq          INTEGER,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    FOREIGN KEY (owner, session_id) REFERENCES conversations (owner, session_id) ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS messages_by_session ON messages (owner, session_id, id);

-- One answer at a time per conversation, enforced by the database (so also across processes).
CREATE UNIQUE INDEX IF NOT EXISTS one_streaming_answer ON messages (owner, session_id)
    WHERE status = 'streaming';

-- step 2: conversations as trees
-- A message follows its parent (NULL for a first message: a root); a conversation's current_message_id is the leaf of the branch the user is on. Each conversation's
-- existing messages become one chain in the order they were written, its newest message the leaf.

-- no cascade: a delete takes a whole branch in one statement (the key is checked at its end)
ALTER TABLE messages ADD COLUMN parent_id TEXT REFERENCES messages (id);

ALTER TABLE conversations ADD COLUMN current_message_id TEXT;

UPDATE messages SET parent_id = (
    SELECT MAX(p.id) FROM messages p
     WHERE p.owner = messages.owner AND p.session_id = messages.session_id AND p.id < messages.id);

UPDATE conversations SET current_message_id = (
    SELECT MAX(m.id) FROM messages m WHERE m.owner = conversations.owner AND m.session_id = conversations.session_id);

-- a message's children (its siblings' lookup, a branch's walk down, the key's check on delete)
CREATE INDEX messages_by_parent ON messages (parent_id, id);

-- a conversation's roots: the siblings of its first message
CREATE INDEX messages_roots ON messages (owner, session_id, id) WHERE parent_id IS NULL;

-- step 3: titles written by the model, and search over what was said
-- title_source says who wrote the title: 'client' (create or PATCH), 'first_line' (the first
-- message's first line, until the model's title replaces it) or 'model'; NULL for a conversation
-- from before this step, whose title stays as it is. title_*_tokens: what the model's title cost.
ALTER TABLE conversations ADD COLUMN title_source TEXT;

ALTER TABLE conversations ADD COLUMN title_prompt_tokens INTEGER;

ALTER TABLE conversations ADD COLUMN title_completion_tokens INTEGER;

ALTER TABLE conversations ADD COLUMN title_total_tokens INTEGER;

-- SQLite: a full-text index with the trigram tokenizer (substrings of 3 characters or more, any
-- script, case-insensitive) of every message not `streaming`, kept in step by triggers. It holds
-- its own copy of the text: messages.search_id is the message's row in it (a column, so VACUUM,
-- which may renumber rowids, cannot break the link).
-- sqlite only
ALTER TABLE messages ADD COLUMN search_id INTEGER;

-- sqlite only
CREATE VIRTUAL TABLE messages_search USING fts5 (content, tokenize = 'trigram');

-- sqlite only
INSERT INTO messages_search (rowid, content) SELECT rowid, content FROM messages WHERE status != 'streaming';

-- sqlite only
UPDATE messages SET search_id = rowid WHERE status != 'streaming';

-- sqlite only
CREATE INDEX messages_by_search_id ON messages (search_id) WHERE search_id IS NOT NULL;

-- sqlite only
CREATE TRIGGER messages_search_insert AFTER INSERT ON messages WHEN new.status != 'streaming'
BEGIN INSERT INTO messages_search (content) VALUES (new.content); UPDATE messages SET search_id = last_insert_rowid() WHERE id = new.id; END;

-- sqlite only
CREATE TRIGGER messages_search_update AFTER UPDATE OF content, status ON messages
WHEN old.search_id IS NOT NULL OR new.status != 'streaming'
BEGIN DELETE FROM messages_search WHERE rowid = old.search_id; INSERT INTO messages_search (content) SELECT new.content WHERE new.status != 'streaming'; UPDATE messages SET search_id = CASE WHEN new.status != 'streaming' THEN last_insert_rowid() END WHERE id = new.id; END;

-- sqlite only
CREATE TRIGGER messages_search_delete AFTER DELETE ON messages WHEN old.search_id IS NOT NULL
BEGIN DELETE FROM messages_search WHERE rowid = old.search_id; END;

-- PostgreSQL: a trigram index (pg_trgm) that serves ILIKE; where the extension cannot be installed,
-- search still works, by scanning the owner's messages.
-- postgresql only
DO $$ BEGIN CREATE EXTENSION IF NOT EXISTS pg_trgm; CREATE INDEX messages_text_search ON messages USING gin (content gin_trgm_ops); EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'pg_trgm is not available, search scans'; END $$;

-- step 4: tool calls
-- An answer's tool calls and their results (tool_steps), and a turn that answers an answer's calls
-- to the app's own tools (tool_results), as JSON arrays (CONTRACT.md, "Tool calls in the store").
-- A tool-results turn is a row with role 'user' and content '' (the role's CHECK cannot change
-- without rebuilding the table on SQLite); the API presents it as role 'tool'.
ALTER TABLE messages ADD COLUMN tool_steps TEXT;

ALTER TABLE messages ADD COLUMN tool_results TEXT;

-- Search finds tool results as it finds text: a server tool's result (a tool_result step's
-- data.content; errors are not searched) and the app's results (tool_results' content), one
-- document a message, its results joined by a line break: the first 20,000 characters of each, and
-- the first 100,000 of a message's in all (indexing costs the one writer about 0.25 s per 1 MB of
-- Latin text and 2 s per million CJK characters: a message's final write stays well under that). Nothing is stored twice: the index
-- holds no copy of the text, which stays in tool_steps / tool_results only.
-- SQLite: a contentless FTS5 table (trigram, as messages_search) whose rowid is the message's
-- search_id. Its triggers follow search_id, which step 3's triggers set once a message is no longer
-- `streaming` (so a running answer's checkpoints index nothing) and clear when it is deleted. A
-- contentless table forgets a document by being told its text again, so the text must be the one
-- indexed: steps and results are never rewritten once a message is no longer `streaming`.
-- sqlite only
CREATE VIRTUAL TABLE messages_tool_search USING fts5 (content, content = '', tokenize = 'trigram');

-- sqlite only
CREATE TRIGGER messages_tool_search_set AFTER UPDATE OF search_id ON messages
WHEN old.search_id IS NOT new.search_id AND (new.tool_steps IS NOT NULL OR new.tool_results IS NOT NULL)
BEGIN INSERT INTO messages_tool_search (messages_tool_search, rowid, content) SELECT 'delete', old.search_id, t FROM (SELECT (SELECT substr(group_concat(t, char(10)), 1, 100000) FROM (SELECT substr(json_extract(value, '$.data.content'), 1, 20000) AS t FROM json_each(old.tool_steps) WHERE json_extract(value, '$.type') = 'tool_result' UNION ALL SELECT substr(json_extract(value, '$.content'), 1, 20000) FROM json_each(old.tool_results))) AS t) WHERE old.search_id IS NOT NULL AND t != ''; INSERT INTO messages_tool_search (rowid, content) SELECT new.search_id, t FROM (SELECT (SELECT substr(group_concat(t, char(10)), 1, 100000) FROM (SELECT substr(json_extract(value, '$.data.content'), 1, 20000) AS t FROM json_each(new.tool_steps) WHERE json_extract(value, '$.type') = 'tool_result' UNION ALL SELECT substr(json_extract(value, '$.content'), 1, 20000) FROM json_each(new.tool_results))) AS t) WHERE new.search_id IS NOT NULL AND t != ''; END;

-- sqlite only
CREATE TRIGGER messages_tool_search_delete AFTER DELETE ON messages
WHEN old.search_id IS NOT NULL AND (old.tool_steps IS NOT NULL OR old.tool_results IS NOT NULL)
BEGIN INSERT INTO messages_tool_search (messages_tool_search, rowid, content) SELECT 'delete', old.search_id, t FROM (SELECT (SELECT substr(group_concat(t, char(10)), 1, 100000) FROM (SELECT substr(json_extract(value, '$.data.content'), 1, 20000) AS t FROM json_each(old.tool_steps) WHERE json_extract(value, '$.type') = 'tool_result' UNION ALL SELECT substr(json_extract(value, '$.content'), 1, 20000) FROM json_each(old.tool_results))) AS t) WHERE t != ''; END;

-- PostgreSQL: the same text, by a function, and a partial trigram index of it over the messages
-- that are not `streaming` and have steps or results (rows from before this step have none: no
-- backfill); without pg_trgm, search scans.
-- postgresql only
CREATE OR REPLACE FUNCTION chatsvc_tool_text(steps text, results text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT left(string_agg(t, chr(10)), 100000) FROM (SELECT left(s.value -> 'data' ->> 'content', 20000) AS t FROM json_array_elements(CAST(steps AS json)) AS s (value) WHERE s.value ->> 'type' = 'tool_result' UNION ALL SELECT left(r.value ->> 'content', 20000) FROM json_array_elements(CAST(results AS json)) AS r (value)) AS texts $$;

-- postgresql only
DO $$ BEGIN CREATE INDEX messages_tool_search ON messages USING gin (chatsvc_tool_text(tool_steps, tool_results) gin_trgm_ops) WHERE status != 'streaming' AND (tool_steps IS NOT NULL OR tool_results IS NOT NULL); EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'pg_trgm is not available, search of tool results scans'; END $$;

-- step 5: files
-- A file an owner uploaded (an image or a document), its bytes in 1 MiB chunks (file_chunks), and
-- the messages that carry it (message_files). An upload streams into an 'uploading' row, which
-- becomes 'ready' once its bytes are checked; the same bytes uploaded twice by one owner are one
-- ready row (files_dedup). What the model is sent is computed once, at upload: a document's text,
-- an image's scaled copy (model_copy). A file is never deleted while a message references it.
-- sqlite only
CREATE TABLE files (id TEXT PRIMARY KEY, owner TEXT NOT NULL DEFAULT '', sha256 TEXT NOT NULL, name TEXT NOT NULL, media_type TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('image', 'document')), size INTEGER NOT NULL, status TEXT NOT NULL CHECK (status IN ('uploading', 'ready')), width INTEGER, height INTEGER, pages INTEGER, text TEXT, text_chars INTEGER, text_tokens INTEGER, text_note TEXT, model_copy BLOB, model_media_type TEXT, model_width INTEGER, model_height INTEGER, created_at TEXT NOT NULL, last_used_at TEXT NOT NULL);
-- postgresql only
CREATE TABLE files (id TEXT PRIMARY KEY, owner TEXT NOT NULL DEFAULT '', sha256 TEXT NOT NULL, name TEXT NOT NULL, media_type TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('image', 'document')), size BIGINT NOT NULL, status TEXT NOT NULL CHECK (status IN ('uploading', 'ready')), width INTEGER, height INTEGER, pages INTEGER, text TEXT, text_chars INTEGER, text_tokens INTEGER, text_note TEXT, model_copy BYTEA, model_media_type TEXT, model_width INTEGER, model_height INTEGER, created_at TEXT NOT NULL, last_used_at TEXT NOT NULL);

-- one ready row per owner and bytes
CREATE UNIQUE INDEX files_dedup ON files (owner, sha256) WHERE status = 'ready';

CREATE INDEX files_by_owner ON files (owner, id);

-- the collector's walk: unreferenced files by age
CREATE INDEX files_by_use ON files (last_used_at);

-- seq 0, 1, …: each chunk 1 MiB but the last
-- sqlite only
CREATE TABLE file_chunks (file_id TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (file_id, seq)) WITHOUT ROWID;
-- postgresql only
CREATE TABLE file_chunks (file_id TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE, seq INTEGER NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (file_id, seq));

-- a message's files, in order; no cascade from files: a referenced file is not deleted
CREATE TABLE message_files (owner TEXT NOT NULL DEFAULT '', message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE, position INTEGER NOT NULL, file_id TEXT NOT NULL REFERENCES files (id), PRIMARY KEY (message_id, position));

CREATE INDEX message_files_by_file ON message_files (file_id);

-- step 6: usage, prices and limits
-- One row per upstream call (usage_calls): an answer's model rounds, a conversation's title. It is
-- written 'reserved' before the call, holding reserved_tokens and reserved_cost against its owner's
-- windows, and 'settled' after it with what the call used (source: 'reported' by the model service,
-- 'estimated' by chatsvc, or 'none'). Costs are in millionths of the currency. day and month are the
-- UTC day and month of the database's clock when the call was reserved. No key to messages: a
-- deleted conversation's calls stay counted.
CREATE TABLE usage_calls (id TEXT PRIMARY KEY, owner TEXT NOT NULL DEFAULT '', session_id TEXT NOT NULL, message_id TEXT, purpose TEXT NOT NULL, model TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('reserved', 'settled')), outcome TEXT, source TEXT, prompt_tokens BIGINT, completion_tokens BIGINT, total_tokens BIGINT, reasoning_tokens BIGINT, cached_tokens BIGINT, cache_creation_tokens BIGINT, reserved_tokens BIGINT NOT NULL DEFAULT 0, reserved_cost BIGINT NOT NULL DEFAULT 0, cost_micros BIGINT, currency TEXT, day TEXT NOT NULL, month TEXT NOT NULL, created_at TEXT NOT NULL, settled_at TEXT);

-- an owner's calls by time (reports), everyone's by time (group_by=user)
CREATE INDEX usage_calls_by_owner ON usage_calls (owner, created_at);

CREATE INDEX usage_calls_by_time ON usage_calls (created_at);

-- an answer's calls (the sweep: the ones still reserved, and what the settled rounds before them counted)
CREATE INDEX usage_calls_by_message ON usage_calls (message_id);

-- An owner's standing: its day's and month's settled tokens and cost and what its running calls hold
-- (day and month say which window the counts are of; the first admission of a new one starts it at 0),
-- its running answers, its answers-per-minute bucket (tokens left, and when it was filled: seconds
-- since the epoch by the database's clock), and an admin's limits for it (limit_*: NULL the global
-- limit, -1 none, else the size; the cost in millionths of the currency).
CREATE TABLE usage_owners (owner TEXT PRIMARY KEY, day TEXT NOT NULL, day_tokens BIGINT NOT NULL DEFAULT 0, day_reserved BIGINT NOT NULL DEFAULT 0, month TEXT NOT NULL, month_tokens BIGINT NOT NULL DEFAULT 0, month_reserved BIGINT NOT NULL DEFAULT 0, month_cost BIGINT NOT NULL DEFAULT 0, month_reserved_cost BIGINT NOT NULL DEFAULT 0, running INTEGER NOT NULL DEFAULT 0, bucket DOUBLE PRECISION, bucket_at DOUBLE PRECISION, limit_tokens_per_day BIGINT, limit_tokens_per_month BIGINT, limit_cost_per_month BIGINT, limit_answers_per_minute BIGINT, limit_concurrent_answers BIGINT, limits_at TEXT, day_reset_at TEXT, month_reset_at TEXT);

-- what an answer used beyond the three counts it had, and what it cost (NULL: not reported, or no prices)
ALTER TABLE messages ADD COLUMN reasoning_tokens BIGINT;

ALTER TABLE messages ADD COLUMN cached_tokens BIGINT;

ALTER TABLE messages ADD COLUMN cost_micros BIGINT;

ALTER TABLE messages ADD COLUMN currency TEXT;
