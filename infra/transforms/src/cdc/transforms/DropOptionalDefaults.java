// Keeps an explicit NULL a NULL: removes the defaults of optional fields from a record's value schema.
package cdc.transforms;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.kafka.common.cache.Cache;
import org.apache.kafka.common.cache.LRUCache;
import org.apache.kafka.common.cache.SynchronizedCache;
import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.connect.connector.ConnectRecord;
import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.SchemaBuilder;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.errors.DataException;
import org.apache.kafka.connect.transforms.Transformation;

/**
 * Removes the default of every optional field of a change event's before and after images (at any depth) from the
 * record's value schema, values unchanged, explicit nulls kept as nulls.
 *
 * <p>Why: Debezium puts a column's DDL default into the field's schema ({@code note text default 'n/a'} gives the
 * field the default "n/a"), and Kafka Connect's {@code Struct.get(field)} returns the schema's default where the
 * stored value is null (KAFKA-8713). The Avro converter (Apicurio 2.6's, which has no setting against it) reads
 * every field that way, so an explicit NULL in such a column would reach Kafka, and every destination, as the
 * default. Here each value is read with {@code getWithoutDefault} into a schema without those defaults, which the
 * converter then cannot substitute. Required fields keep their defaults: Debezium fills a delete's before image
 * of a NOT NULL column with a placeholder, never with null, and Connect accepts a null in a required field only
 * where the field has a default. A schema whose images hold no optional default passes through unchanged (same
 * schema object, so the same registry id).
 */
public abstract class DropOptionalDefaults<R extends ConnectRecord<R>> implements Transformation<R> {

    private static final ConfigDef CONFIG = new ConfigDef();

    private Cache<Schema, Schema> schemas;

    @Override
    public void configure(Map<String, ?> props) {
        schemas = new SynchronizedCache<>(new LRUCache<>(256));
    }

    @Override
    public R apply(R record) {
        Schema schema = operatingSchema(record);
        if (schema == null) {
            return record; // schemaless: there is no default to substitute
        }
        Schema updated = schemas.get(schema);
        if (updated == null) {
            updated = imagesWithoutOptionalDefaults(schema);
            schemas.put(schema, updated);
        }
        if (updated == schema) {
            return record;
        }
        return newRecord(record, updated, convert(schema, updated, operatingValue(record)));
    }

    /**
     * A change event's schema with its images (the top-level {@code before} and {@code after}) rewritten; the same
     * object when they hold no optional default, or when the value is no change event (heartbeats, transaction
     * markers). The {@code source} block keeps its defaults: Debezium leaves its {@code snapshot} field null outside
     * snapshots, which readers know as the default "false".
     */
    static Schema imagesWithoutOptionalDefaults(Schema schema) {
        if (schema.type() != Schema.Type.STRUCT || schema.field("before") == null && schema.field("after") == null) {
            return schema;
        }
        boolean changed = false;
        SchemaBuilder builder = SchemaBuilder.struct().name(schema.name()).version(schema.version()).doc(schema.doc());
        if (schema.parameters() != null) {
            builder.parameters(schema.parameters());
        }
        if (schema.isOptional()) {
            builder.optional();
        }
        for (Field field : schema.fields()) {
            Schema fs = field.schema();
            if (field.name().equals("before") || field.name().equals("after")) {
                fs = withoutOptionalDefaults(fs);
                changed |= fs != field.schema();
            }
            builder.field(field.name(), fs);
        }
        return changed ? builder.build() : schema;
    }

    /** The schema without optional (nested) schemas' defaults; the same object when there is none to remove. */
    static Schema withoutOptionalDefaults(Schema schema) {
        boolean dropDefault = schema.isOptional() && schema.defaultValue() != null;
        SchemaBuilder builder;
        switch (schema.type()) {
            case STRUCT: {
                List<Schema> fields = new ArrayList<>();
                boolean changed = dropDefault;
                for (Field field : schema.fields()) {
                    Schema fs = withoutOptionalDefaults(field.schema());
                    changed |= fs != field.schema();
                    fields.add(fs);
                }
                if (!changed) {
                    return schema;
                }
                builder = SchemaBuilder.struct();
                for (int i = 0; i < fields.size(); i++) {
                    builder.field(schema.fields().get(i).name(), fields.get(i));
                }
                break;
            }
            case ARRAY: {
                Schema element = withoutOptionalDefaults(schema.valueSchema());
                if (element == schema.valueSchema() && !dropDefault) {
                    return schema;
                }
                builder = SchemaBuilder.array(element);
                break;
            }
            case MAP: {
                Schema key = withoutOptionalDefaults(schema.keySchema());
                Schema value = withoutOptionalDefaults(schema.valueSchema());
                if (key == schema.keySchema() && value == schema.valueSchema() && !dropDefault) {
                    return schema;
                }
                builder = SchemaBuilder.map(key, value);
                break;
            }
            default:
                if (!dropDefault) {
                    return schema;
                }
                builder = new SchemaBuilder(schema.type());
        }
        if (!schema.isOptional() && schema.defaultValue() != null) {
            // A required container with a default, holding an optional default: its default is a value of the old
            // schema. Debezium makes none; refuse rather than drop it unseen.
            throw new DataException("DropOptionalDefaults: the required " + schema.type() + " " + schema.name()
                    + " has a default and holds optional fields with defaults; not supported");
        }
        builder.name(schema.name()).version(schema.version()).doc(schema.doc());
        if (schema.parameters() != null) {
            builder.parameters(schema.parameters());
        }
        if (schema.isOptional()) {
            builder.optional();
        }
        return builder.build();
    }

    /** `value` (of `from`) as a value of `to`, every field read without its default. */
    private static Object convert(Schema from, Schema to, Object value) {
        if (value == null || from == to) {
            return value;
        }
        switch (from.type()) {
            case STRUCT: {
                if (!(value instanceof Struct)) {
                    throw new DataException("DropOptionalDefaults: expected a Struct, got " + value.getClass().getName());
                }
                Struct in = (Struct) value;
                Struct out = new Struct(to);
                for (Field field : from.fields()) {
                    // A field whose schema is unchanged (the envelope's source block) is read as before.
                    Field target = to.field(field.name());
                    Object v = target.schema() == field.schema() ? in.get(field) : in.getWithoutDefault(field.name());
                    out.put(target, convert(field.schema(), target.schema(), v));
                }
                return out;
            }
            case ARRAY: {
                List<Object> out = new ArrayList<>();
                for (Object element : (List<?>) value) {
                    out.add(convert(from.valueSchema(), to.valueSchema(), element));
                }
                return out;
            }
            case MAP: {
                Map<Object, Object> out = new LinkedHashMap<>();
                for (Map.Entry<?, ?> e : ((Map<?, ?>) value).entrySet()) {
                    out.put(convert(from.keySchema(), to.keySchema(), e.getKey()),
                            convert(from.valueSchema(), to.valueSchema(), e.getValue()));
                }
                return out;
            }
            default:
                return value;
        }
    }

    @Override
    public ConfigDef config() {
        return CONFIG;
    }

    @Override
    public void close() {
    }

    protected abstract Schema operatingSchema(R record);

    protected abstract Object operatingValue(R record);

    protected abstract R newRecord(R record, Schema updatedSchema, Object updatedValue);

    /** On the record value (a change event's envelope). */
    public static class Value<R extends ConnectRecord<R>> extends DropOptionalDefaults<R> {
        @Override
        protected Schema operatingSchema(R record) {
            return record.valueSchema();
        }

        @Override
        protected Object operatingValue(R record) {
            return record.value();
        }

        @Override
        protected R newRecord(R record, Schema updatedSchema, Object updatedValue) {
            return record.newRecord(record.topic(), record.kafkaPartition(), record.keySchema(), record.key(),
                    updatedSchema, updatedValue, record.timestamp(), record.headers());
        }
    }
}
