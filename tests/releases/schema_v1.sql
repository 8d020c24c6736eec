-- chatsvc schema. Applied at every start, so every statement must be idempotent.
-- Portable between SQLite and PostgreSQL. Times are RFC 3339 UTC text, which sorts in time order.
-- (No colons or percent signs in this file, the statements go through bind-parameter parsing.)

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
