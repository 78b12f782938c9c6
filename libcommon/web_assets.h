/* The web client (web/ in the source tree), embedded into every binary that
 * links libcommon at build time (build/gen/web_assets_data.c, written by
 * web/embed.sh), so a gateway or parleyd serves it with no files beside it.
 * Served at GET / (index.html) and GET /<file name>, with the content type
 * from the file's extension and a content-hash ETag. */
#ifndef PARLEY_WEB_ASSETS_H
#define PARLEY_WEB_ASSETS_H

#include <stddef.h>

struct MHD_Connection;

typedef struct web_asset {
    const char *path;            /* URL path, "/app.js" */
    const unsigned char *data;   /* the bytes (NUL-terminated, not counted) */
    size_t len;
    const char *etag;            /* quoted, as sent in the ETag header */
} web_asset;

/* The generated table. */
extern const web_asset web_assets_table[];
extern const size_t web_assets_count;

/* The asset for a request path ("/" means "/index.html"), or NULL. */
const web_asset *web_assets_find(const char *url);

/* The Content-Type for a path, by extension (application/octet-stream for
 * an unknown one). */
const char *web_assets_type(const char *path);

/* Queues the asset on an MHD connection: 200 with the bytes, or 304 when
 * the request's If-None-Match names its ETag. Returns MHD's result
 * (an enum MHD_Result, as int so this header needs no microhttpd.h). */
int web_assets_respond(struct MHD_Connection *mc, const web_asset *a);

#endif
