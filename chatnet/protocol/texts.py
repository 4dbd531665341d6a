"""Every text chatnet puts on the wire, in one place: the seed reference server's answers
(compared literally by clients, so never reworded), the extension texts, the backups' redirect
notes, and the prefaces that tell a peer or status connection from a client.

Server and client both import these, so the two can never disagree on a string.
"""

# Texts the server answers (status 1, indicator 0) for requests it cannot parse.  The
# first one is the seed reference server's exact text; clients compare it literally.
INVALID_REQUEST_TEXT = "Invalid operation. Please input your request as [operation]|[params]."
TOO_LONG_TEXT = "Request too long: a request may have at most 280 characters."
NOT_UTF8_TEXT = "Invalid request: requests must be UTF-8 text."

MAX_USERNAME_CHARS = 32

# The reference server's texts (shared/seed/reference-behaviour.md), compared literally by clients.
USERNAME_RULE = f"Usernames are 1 to {MAX_USERNAME_CHARS} characters with no spaces, control characters or '|'."
T_CREATED = "Account created! Logged in as {name}."
T_CREATE_LOGGED_IN = (
    "Unable to create account: You are already logged in as {me}. "
    "Please exit and start a new client to log into a different account."
)
T_CREATE_TAKEN = "Unable to create account: This username is already taken."
T_CREATE_BAD_NAME = "Unable to create account: " + USERNAME_RULE
T_LOGGED_IN = "Logged in as {name}."
T_LOGIN_LOGGED_IN = (
    "Unable to login: You are already logged in as {me}. "
    "Please exit and start a new client to log into a different account."
)
T_LOGIN_UNKNOWN = (
    "Unable to login: This username does not exist. If you would like to use this username, please create a new account."
)
T_LOGIN_CONNECTED = "Unable to login: This user is already connected to the server."
T_MISSED = "You have {n} missed messages above."
T_NO_MISSED = "No new messages since you've been gone."
T_MUST_LOGIN = "Must be logged in to perform this operation. Please login or create an account."
T_NO_RECIPIENT = "Recipient username cannot be found."
T_TO_SELF = "Cannot send messages to yourself."
T_EMPTY_MESSAGE = "Cannot send an empty message."
T_SENT = "Message sent to {recipient}."
T_DELETED = "Account {name} has been deleted. You are now logged out."
T_UNSUPPORTED = "This operation is not supported by this server."
# Quotas and paging (chatnet additions; config.Limits, docs/protocol.md "Limits of the chat layer").
T_CREATE_FULL = "Unable to create account: this server has reached its maximum number of accounts."
T_MAILBOX_FULL = "Unable to send: {recipient} has too many undelivered messages. Please try again later."
# Last line of a `list` answer that was cut at the page size: the request that lists the rest.
T_LIST_MORE = "More accounts: request 4|{pattern}|{after} for the next page."
# Extension 1 (docs/protocol.md): sessions that survive failover.
EXTENSION = "1"
T_EXT = "ext|" + EXTENSION
T_TOKEN = "token|{token}"
T_RESUMED = "Resumed as {name}."
T_RESUME_BAD_TOKEN = "Unable to resume: the session token is not valid. Please log in again."
T_RESUME_UNKNOWN = "Unable to resume: This username does not exist."
T_RESUME_LOGGED_IN = "Unable to resume: You are already logged in as {me}."
T_RESUME_TOKEN_NOT_ASCII = "Unable to resume: a session token is ASCII text. Please log in again."
# The token's epoch (the view whose chat the session last received) is not in this replica's
# history: its LAST_SEQ numbers another side's mailbox after a split brain (docs/protocol.md).
T_RESUME_OTHER_HISTORY = ("Unable to resume: the session's sequence numbers come from another side of a "
                          "network partition. Please log in again.")
# Extension 2 (docs/protocol.md): account passwords.
PASSWORD_EXTENSION = "2"
T_EXT_PASSWORDS = "ext|" + PASSWORD_EXTENSION
MAX_PASSWORD_CHARS = 128
PASSWORD_RULE = f"Passwords are 1 to {MAX_PASSWORD_CHARS} characters with no '|' or control characters."
T_CREATE_BAD_PASSWORD = "Unable to create account: " + PASSWORD_RULE
T_LOGIN_WRONG_PASSWORD = "Unable to login: wrong password. Your next attempt will wait {seconds:g} s."
T_LOGIN_NEEDS_PASSWORD = (
    "Unable to login: this account has a password. Log in with a client that asks for it "
    "(chatnet's chatclient)."
)
T_LOGIN_PASSWORD_CHANGED = "Unable to login: the password changed meanwhile. Please try again."
T_DELETE_NEEDS_PASSWORD = (
    "Unable to delete account: this account has a password. Delete it with a client that asks for it "
    "(chatnet's chatclient)."
)
T_DELETE_WRONG_PASSWORD = "Unable to delete account: wrong password. Your next attempt will wait {seconds:g} s."
T_PASSWORD_CHANGED = "Password changed."
T_PASSWD_BAD = "Unable to change password: " + PASSWORD_RULE
T_PASSWD_WRONG = "Unable to change password: wrong password. Your next attempt will wait {seconds:g} s."
T_PASSWD_RACE = "Unable to change password: the password changed meanwhile. Please try again."
# --require-passwords: what seed-style clients (and password-less accounts) are told.
T_POLICY_CREATE = (
    "Unable to create account: this server requires a password for every account. "
    "Use a client that asks for one (chatnet's chatclient)."
)
T_POLICY_LOGIN = (
    "Unable to login: this server requires passwords. Use a client that asks for one (chatnet's chatclient)."
)
T_POLICY_NO_PASSWORD = (
    "Unable to login: this account has no password, and this server requires one. "
    "It can be used again only where password-less accounts are allowed."
)
# The backups' notes (status 2, indicator 0), specified by the replication design.
T_BACKUP_KNOWS = "This server is a backup. The primary is at {address}."
T_BACKUP_UNKNOWN = "This server is a backup and knows no primary yet. Try again shortly."

# First bytes of a connection that is not a client: a replica dialling a peer, or a status query.
PEER_PREFACE = b"CHATNET-PEER\n"
STATUS_PREFACE = b"CHATNET-STATUS\n"  # public status (chatnet/server/status.py)
STATUS_AUTH_PREFACE = b"CHATNET-STATUS-AUTH\n"  # full status, for holders of the cluster secret
MEMBERS_PREFACE = b"CHATNET-MEMBERS\n"  # `chatserver members`, for holders of the cluster secret
BACKUP_PREFACE = b"CHATNET-BACKUP-AUTH\n"  # a copy of the store, for holders of the secret (backup.py)
PREFACES = (PEER_PREFACE, STATUS_PREFACE, STATUS_AUTH_PREFACE, MEMBERS_PREFACE, BACKUP_PREFACE)

# Connection limits (docs/operations.md): said once, then the connection is closed.
T_SERVER_FULL = "Server is full: too many connections. Try again later."
T_ADDRESS_FULL = "Too many connections from your address. Close some and try again."
T_HANDSHAKE_TIMEOUT = "Closed: no complete request within {seconds:g} seconds."
T_IDLE_TIMEOUT = "Closed: idle for {seconds:g} seconds without logging in."
T_TLS_REQUIRED = ("This server requires TLS. Connect with a TLS client "
                  "(chatnet's chatclient --tls-ca FILE, or --tls).")
