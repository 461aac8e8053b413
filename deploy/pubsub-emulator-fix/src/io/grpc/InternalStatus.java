/*
 * io.grpc.InternalStatus as the Pub/Sub emulator's own grpc-core expects it.
 *
 * The emulator's jar (Google Cloud CLI, cloud-pubsub-emulator 0.8.20) bundles a grpc-core whose
 * ServerImpl calls InternalStatus.asRuntimeException(Status, Metadata, boolean) when a client
 * cancels a call, and a grpc-api whose InternalStatus lacks that method. Every cancelled call
 * then dies with NoSuchMethodError before the server learns of the cancellation; for a
 * StreamingPull that means the emulator keeps the closed stream as a subscriber and goes on
 * handing it messages nobody will receive. Put this class ahead of the jar on the class path
 * (see README.md); it keeps the bundled class's members and adds the missing one.
 */
package io.grpc;

public final class InternalStatus {
  public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;
  public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

  private InternalStatus() {}

  public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(Status status, Metadata trailers) {
    return new InternalStatusRuntimeException(status, trailers);
  }

  /** The method grpc-core's ServerImpl calls when a call is cancelled. */
  public static StatusRuntimeException asRuntimeException(
      Status status, Metadata trailers, boolean fillInStackTrace) {
    return fillInStackTrace
        ? new StatusRuntimeException(status, trailers)
        : new InternalStatusRuntimeException(status, trailers);
  }
}
